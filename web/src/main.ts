// The call client's screens: login, room list, lobby (preview and devices), call (tiles,
// controls, badges, statistics). Plain DOM; every control is a button or a labelled input.
import "./style.css";

import { EventType, type MatrixClient, type MatrixEvent, type Room, RoomEvent } from "matrix-js-sdk";

import { Call, type Participant, type TransportPreference } from "./call.ts";
import { discoverSfu, type Discovered } from "./discovery.ts";
import {
  UserFacingError,
  forgetSession,
  loadSession,
  loginKinds,
  logout,
  passwordLogin,
  resolveHomeserver,
  ssoRedirectUrl,
  startClient,
  tokenLogin,
} from "./matrix.ts";

const app = document.getElementById("app")!;
const params = new URLSearchParams(location.search);

interface State {
  client?: MatrixClient;
  discovered?: Discovered;
  call?: Call;
  preview?: MediaStream;
  ring?: { room: Room; event: MatrixEvent; from: string };
}
const state: State = {};

type Child = Node | string | null | undefined | false;

function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string | boolean | ((ev: Event) => void)> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (typeof v === "function") el.addEventListener(k.replace(/^on/, ""), v as EventListener);
    else if (v === true) el.setAttribute(k, "");
    else if (v !== false) el.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined && c !== false) el.append(c);
  return el;
}

function show(...nodes: Child[]): void {
  app.replaceChildren(...(nodes.filter(Boolean) as Node[]));
}

function banner(message: string | null, kind: "error" | "info" = "error"): HTMLElement | null {
  if (!message) return null;
  return h("p", { class: `banner ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
}

function describe(e: unknown): string {
  if (e instanceof UserFacingError) return e.message;
  if (e instanceof Error) return `Something went wrong: ${e.message}`;
  return `Something went wrong: ${String(e)}`;
}

// ---- login ------------------------------------------------------------------------------

function loginScreen(error: string | null = null): void {
  const hs = h("input", { id: "hs", name: "homeserver", autocomplete: "url", value: params.get("hs") ?? localStorage.getItem("mrtc.hs") ?? "" });
  const user = h("input", { id: "user", name: "username", autocomplete: "username", value: params.get("user") ?? "" });
  const pw = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password" });
  const status = h("p", { class: "hint", role: "status" });
  const submit = h("button", { type: "submit" }, "Log in");
  const sso = h("button", { type: "button", class: "secondary", hidden: true }, "Log in with single sign-on");
  let base: string | null = null;
  const checkSso = async () => {
    try {
      base = await resolveHomeserver(hs.value);
      const kinds = await loginKinds(base);
      sso.hidden = !kinds.sso;
    } catch {
      sso.hidden = true;
    }
  };
  hs.addEventListener("change", () => void checkSso());
  sso.addEventListener("click", async () => {
    try {
      base ??= await resolveHomeserver(hs.value);
      localStorage.setItem("mrtc.hs", base);
      location.href = ssoRedirectUrl(base, location.href.split("?")[0]);
    } catch (e) {
      loginScreen(describe(e));
    }
  });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Join a call"),
    banner(error),
    h("label", { for: "hs" }, "Homeserver"),
    hs,
    h("label", { for: "user" }, "User name"),
    user,
    h("label", { for: "password" }, "Password"),
    pw,
    submit,
    sso,
    status,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    status.textContent = "Logging in…";
    try {
      base = await resolveHomeserver(hs.value);
      localStorage.setItem("mrtc.hs", base);
      const session = await passwordLogin(base, user.value, pw.value);
      await enter(session);
    } catch (e) {
      loginScreen(describe(e));
    }
  });
  show(form);
  if (hs.value) void checkSso();
  (hs.value ? (user.value ? pw : user) : hs).focus();
}

async function enter(session: NonNullable<ReturnType<typeof loadSession>>): Promise<void> {
  show(h("p", { class: "loading", role: "status" }, "Connecting to your homeserver…"));
  const client = await startClient(session);
  state.client = client;
  state.discovered = await discoverSfu(client, params.get("livekit_service_url"));
  client.on(RoomEvent.Timeline, onTimeline);
  const roomParam = params.get("room");
  const room = roomParam ? client.getRoom(roomParam) : null;
  if (room) lobby(room);
  else roomList();
}

// ---- rooms --------------------------------------------------------------------------------

function roomList(error: string | null = null): void {
  const client = state.client!;
  const rooms = client
    .getRooms()
    .filter((r) => r.getMyMembership() === "join" || r.getMyMembership() === "invite")
    .sort((a, b) => (a.name || "").localeCompare(b.name || ""));
  const items = rooms.map((r) => {
    const session = client.matrixRTC.getRoomSession(r);
    const inCall = session.memberships.length;
    const invited = r.getMyMembership() === "invite";
    const label = `${r.name || r.roomId}${inCall ? ` — call in progress (${inCall})` : ""}${invited ? " — invited" : ""}`;
    return h(
      "li",
      {},
      h(
        "button",
        {
          class: "room",
          "data-room-id": r.roomId,
          onclick: async () => {
            try {
              if (invited) await client.joinRoom(r.roomId);
              lobby(client.getRoom(r.roomId) ?? r);
            } catch (e) {
              roomList(describe(e));
            }
          },
        },
        label,
      ),
    );
  });
  const sfu = state.discovered?.focus
    ? `Call server: ${state.discovered.focus.livekit_service_url} (from ${state.discovered.source})`
    : "This homeserver advertises no call server (SFU): calls run as a full mesh.";
  show(
    h(
      "section",
      { class: "card wide", "aria-labelledby": "rooms-title" },
      h("header", { class: "row" }, h("h1", { id: "rooms-title" }, "Rooms"), h("span", { class: "who" }, client.getUserId() ?? "")),
      banner(error),
      h("p", { class: "hint" }, sfu),
      items.length ? h("ul", { class: "rooms" }, ...items) : h("p", {}, "You are in no rooms yet."),
      h(
        "div",
        { class: "row" },
        h("button", { onclick: () => void newRoom() }, "New call room"),
        h("button", { class: "secondary", onclick: () => void logout(client).finally(() => location.reload()) }, "Log out"),
      ),
    ),
  );
}

async function newRoom(): Promise<void> {
  const client = state.client!;
  const name = prompt("Name of the new room", "Call") ?? "";
  if (!name) return;
  try {
    const { room_id } = await client.createRoom({
      name,
      preset: "private_chat" as never,
      initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
      power_level_content_override: { events: { "org.matrix.msc3401.call.member": 0 } },
    });
    const deadline = Date.now() + 5000;
    while (!client.getRoom(room_id) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const room = client.getRoom(room_id);
    if (room) lobby(room);
    else roomList();
  } catch (e) {
    roomList(describe(e));
  }
}

// ---- ringing ------------------------------------------------------------------------------

function onTimeline(ev: MatrixEvent, room: Room | undefined, toStartOfTimeline: boolean | undefined): void {
  if (toStartOfTimeline || !room) return;
  // In an encrypted room the notification arrives encrypted: look at it once decrypted.
  if (ev.isEncrypted() && ev.getType() === "m.room.encrypted") {
    void state.client!.decryptEventIfNeeded(ev).then(() => {
      if (ev.getType() === EventType.RTCNotification) onNotification(ev, room);
    });
    return;
  }
  if (ev.getType() === EventType.RTCNotification) onNotification(ev, room);
}

function onNotification(ev: MatrixEvent, room: Room): void {
  const client = state.client!;
  if (ev.getSender() === client.getUserId()) return;
  const c = ev.getContent();
  const mentions = c["m.mentions"] ?? {};
  const forMe = mentions.room === true || (mentions.user_ids ?? []).includes(client.getUserId() ?? "");
  const lifetime = typeof c.lifetime === "number" ? c.lifetime : 30000;
  const sent = typeof c.sender_ts === "number" ? c.sender_ts : ev.getTs();
  if (!forMe || c.notification_type !== "ring" || Date.now() > sent + lifetime || state.call) return;
  state.ring = { room, event: ev, from: room.getMember(ev.getSender()!)?.rawDisplayName ?? ev.getSender()! };
  renderRing();
  setTimeout(() => {
    if (state.ring?.event === ev) {
      state.ring = undefined;
      renderRing();
    }
  }, Math.max(0, sent + lifetime - Date.now()));
}

function renderRing(): void {
  document.getElementById("ring")?.remove();
  const ring = state.ring;
  if (!ring) return;
  const el = h(
    "div",
    { id: "ring", class: "ring", role: "alertdialog", "aria-labelledby": "ring-title" },
    h("p", { id: "ring-title" }, `${ring.from} is calling in ${ring.room.name}`),
    h("button", { onclick: () => { state.ring = undefined; renderRing(); lobby(ring.room); } }, "Answer"),
    h(
      "button",
      {
        class: "danger",
        onclick: async () => {
          state.ring = undefined;
          renderRing();
          await state.client!.sendEvent(ring.room.roomId, null, EventType.RTCDecline, {
            "m.relates_to": { rel_type: "m.reference", event_id: ring.event.getId()! },
          } as never);
        },
      },
      "Decline",
    ),
  );
  document.body.append(el);
}

// ---- lobby --------------------------------------------------------------------------------

/** Capture size: `?video=WxH` (default 640x360; smaller saves CPU in a full mesh). */
function captureSize(): { width: number; height: number } {
  const m = /^(\d+)x(\d+)$/.exec(params.get("video") ?? "");
  return m ? { width: Number(m[1]), height: Number(m[2]) } : { width: 640, height: 360 };
}

async function getMedia(video: string | null, audio: string | null): Promise<MediaStream> {
  const size = captureSize();
  try {
    return await navigator.mediaDevices.getUserMedia({
      video: { ...(video ? { deviceId: { exact: video } } : {}), width: { ideal: size.width }, height: { ideal: size.height } },
      audio: audio ? { deviceId: { exact: audio } } : true,
    });
  } catch (e) {
    const name = (e as DOMException)?.name;
    if (name === "NotAllowedError" || name === "SecurityError") {
      throw new UserFacingError("Camera and microphone permission was denied. Allow them in the browser's site settings, then try again.");
    }
    if (name === "NotFoundError" || name === "OverconstrainedError") {
      throw new UserFacingError("No camera or microphone was found. Connect one, then try again.");
    }
    if (name === "NotReadableError") throw new UserFacingError("The camera or microphone is in use by another program.");
    throw new UserFacingError(`Camera and microphone could not be opened: ${e instanceof Error ? e.message : e}`);
  }
}

function lobby(room: Room, error: string | null = null): void {
  const client = state.client!;
  const session = client.matrixRTC.getRoomSession(room);
  const preview = h("video", { class: "preview", autoplay: true, muted: true, playsinline: true, "aria-label": "Your camera preview" });
  const camSel = h("select", { id: "camera" });
  const micSel = h("select", { id: "microphone" });
  const transport = h(
    "select",
    { id: "transport" },
    h("option", { value: "auto" }, "Automatic (mesh for small calls, SFU for large)"),
    h("option", { value: "sfu" }, "SFU only"),
    h("option", { value: "mesh" }, "Mesh only"),
  );
  const dialect = h(
    "select",
    { id: "dialect" },
    h("option", { value: "state" }, "Room state (call.member, compatible)"),
    h("option", { value: "sticky" }, "Sticky events (m.rtc.member, Matrix 2.0)"),
  );
  if (params.get("transport")) transport.value = params.get("transport")!;
  if (params.get("dialect")) dialect.value = params.get("dialect")!;
  const ring = h("input", { id: "ring-others", type: "checkbox" });
  const camOn = h("input", { id: "cam-on", type: "checkbox", checked: true });
  const micOn = h("input", { id: "mic-on", type: "checkbox", checked: true });
  const join = h("button", { id: "join", disabled: true }, session.memberships.length ? "Join call" : "Start call");
  const status = h("p", { class: "hint", role: "status" });
  const errorBox = h("div", {}, banner(error));

  const open = async () => {
    state.preview?.getTracks().forEach((t) => t.stop());
    state.preview = undefined;
    join.disabled = true;
    try {
      state.preview = await getMedia(camSel.value || null, micSel.value || null);
      preview.srcObject = state.preview;
      errorBox.replaceChildren();
      join.disabled = false;
      const devices = await navigator.mediaDevices.enumerateDevices();
      const fill = (sel: HTMLSelectElement, kind: MediaDeviceKind, current?: string) => {
        const keep = sel.value || current;
        sel.replaceChildren(
          ...devices.filter((d) => d.kind === kind).map((d, i) => h("option", { value: d.deviceId }, d.label || `${kind} ${i + 1}`)),
        );
        if (keep) sel.value = keep;
      };
      fill(camSel, "videoinput", state.preview.getVideoTracks()[0]?.getSettings().deviceId);
      fill(micSel, "audioinput", state.preview.getAudioTracks()[0]?.getSettings().deviceId);
    } catch (e) {
      errorBox.replaceChildren(banner(describe(e))!);
    }
  };
  camSel.addEventListener("change", () => void open());
  micSel.addEventListener("change", () => void open());
  camOn.addEventListener("change", () => state.preview?.getVideoTracks().forEach((t) => (t.enabled = camOn.checked)));
  micOn.addEventListener("change", () => state.preview?.getAudioTracks().forEach((t) => (t.enabled = micOn.checked)));
  join.addEventListener("click", () => {
    if (!state.preview) return;
    const stream = state.preview;
    state.preview = undefined;
    startCall(room, stream, {
      prefer: transport.value as TransportPreference,
      sticky: dialect.value === "sticky",
      ring: ring.checked,
      audioMuted: !micOn.checked,
      videoMuted: !camOn.checked,
    });
  });
  const others = session.memberships.map((m) => room.getMember(m.sender)?.rawDisplayName ?? m.sender);
  show(
    h(
      "section",
      { class: "card wide lobby", "aria-labelledby": "lobby-title" },
      h("header", { class: "row" }, h("h1", { id: "lobby-title" }, room.name || room.roomId), h("button", { class: "secondary", onclick: () => { state.preview?.getTracks().forEach((t) => t.stop()); roomList(); } }, "Back to rooms")),
      errorBox,
      h("p", { class: "hint" }, others.length ? `In the call: ${others.join(", ")}` : "Nobody is in this room's call yet."),
      h("p", { class: "hint" }, room.hasEncryptionStateEvent() ? "This room is encrypted: call media is end-to-end encrypted." : "This room is not encrypted: media keys would go in clear, so media stays unencrypted beyond DTLS."),
      preview,
      h(
        "div",
        { class: "grid2" },
        h("label", { for: "camera" }, "Camera"),
        camSel,
        h("label", { for: "microphone" }, "Microphone"),
        micSel,
        h("label", { for: "transport" }, "Media transport"),
        transport,
        h("label", { for: "dialect" }, "Membership form"),
        dialect,
      ),
      h("div", { class: "row" }, h("label", {}, camOn, " Camera on"), h("label", {}, micOn, " Microphone on"), h("label", {}, ring, " Ring the others")),
      join,
      status,
    ),
  );
  void open();
}

// ---- call ---------------------------------------------------------------------------------

const E2EE_TEXT: Record<Participant["e2ee"], string> = {
  decrypting: "E2EE: decrypting",
  undecryptable: "E2EE: cannot decrypt this participant's media (no matching key)",
  "waiting-for-key": "E2EE: waiting for this participant's key",
  "waiting-for-media": "E2EE: key received, waiting for media",
};

function startCall(
  room: Room,
  stream: MediaStream,
  o: { prefer: TransportPreference; sticky: boolean; ring: boolean; audioMuted: boolean; videoMuted: boolean },
): void {
  const client = state.client!;
  const call = new Call(client, room, { stream, audioMuted: o.audioMuted, videoMuted: o.videoMuted }, {
    sticky: o.sticky,
    focus: state.discovered?.focus ?? null,
    prefer: o.prefer,
    meshMax: Number(params.get("mesh_max") ?? 4),
    ring: o.ring,
    // For tests and demonstrations only: drop every other member's media key (a LiveKit
    // token, but no Matrix keys); nothing of theirs can be decrypted.
    keyless: params.get("keyless") === "1",
  });
  state.call = call;
  const tiles = h("div", { class: "tiles", role: "list", "aria-label": "Participants" });
  const selfTile = h(
    "div",
    { class: "tile self", role: "listitem", "aria-label": "You" },
    h("video", { autoplay: true, muted: true, playsinline: true }),
    h("div", { class: "name" }, "You"),
  );
  (selfTile.querySelector("video") as HTMLVideoElement).srcObject = stream;
  const errorBox = h("div", { "aria-live": "polite" });
  const transportBadge = h("span", { class: "badge", id: "transport-badge" });
  const mic = h("button", { id: "mic", "aria-pressed": String(o.audioMuted) }, "");
  const cam = h("button", { id: "cam", "aria-pressed": String(o.videoMuted) }, "");
  const screen = h("button", { id: "screen", "aria-pressed": "false" }, "Share screen");
  const statsBtn = h("button", { id: "stats-toggle", "aria-expanded": "false", "aria-controls": "stats" }, "Statistics");
  const leave = h("button", { id: "leave", class: "danger" }, "Leave");
  const statsPanel = h("section", { id: "stats", class: "stats", hidden: true, "aria-label": "Call statistics" });
  const refreshButtons = () => {
    mic.textContent = call.media.audioMuted ? "Unmute microphone" : "Mute microphone";
    mic.setAttribute("aria-pressed", String(call.media.audioMuted));
    cam.textContent = call.media.videoMuted ? "Turn camera on" : "Turn camera off";
    cam.setAttribute("aria-pressed", String(call.media.videoMuted));
    screen.textContent = call.media.screen ? "Stop sharing" : "Share screen";
    screen.setAttribute("aria-pressed", String(!!call.media.screen));
  };
  mic.addEventListener("click", () => void call.setMuted("audio", !call.media.audioMuted).then(refreshButtons));
  cam.addEventListener("click", () => void call.setMuted("video", !call.media.videoMuted).then(refreshButtons));
  screen.addEventListener("click", () =>
    void call.setScreenShare(!call.media.screen).catch((e) => errorBox.replaceChildren(banner(describe(e))!)).then(refreshButtons),
  );
  statsBtn.addEventListener("click", () => {
    statsPanel.hidden = !statsPanel.hidden;
    statsBtn.setAttribute("aria-expanded", String(!statsPanel.hidden));
    render();
  });
  leave.addEventListener("click", async () => {
    leave.disabled = true;
    await call.leave();
    state.call = undefined;
    roomList();
  });
  refreshButtons();
  const tileEls = new Map<string, HTMLElement>();
  const render = () => {
    errorBox.replaceChildren(...[banner(call.error)].filter((x): x is HTMLElement => !!x));
    // The mesh does not renegotiate (the Python mesh engine sends no offers): screen sharing
    // needs the SFU.
    screen.disabled = call.kind !== "sfu" && !call.media.screen;
    screen.title = screen.disabled ? "Screen sharing needs the call server (SFU)" : "";
    transportBadge.textContent = call.kind ? `Transport: ${call.kind === "sfu" ? "SFU (LiveKit)" : call.kind === "mesh" ? "full mesh" : "none"}` : "Transport: joining…";
    const seen = new Set<string>();
    for (const p of call.participants) {
      seen.add(p.identity);
      let el = tileEls.get(p.identity);
      if (!el) {
        el = h(
          "div",
          { class: "tile", role: "listitem", "data-identity": p.identity },
          h("video", { autoplay: true, playsinline: true, muted: true }),
          h("audio", { autoplay: true }),
          h("div", { class: "name" }),
          h("div", { class: "badges" }),
          h("p", { class: "tile-message" }),
        );
        tileEls.set(p.identity, el);
        tiles.append(el);
      }
      el.setAttribute("aria-label", p.name);
      const video = el.querySelector("video")!;
      const audio = el.querySelector("audio")!;
      const vt = p.media?.screen ?? p.media?.video;
      const cur = (video.srcObject as MediaStream | null)?.getVideoTracks()[0];
      if (vt && cur !== vt) video.srcObject = new MediaStream([vt]);
      if (!vt && cur) video.srcObject = null;
      const at = p.media?.audio;
      const curA = (audio.srcObject as MediaStream | null)?.getAudioTracks()[0];
      if (at && curA !== at) audio.srcObject = new MediaStream([at]);
      el.classList.toggle("speaking", p.speaking);
      el.querySelector(".name")!.textContent = `${p.name}${p.media?.audioMuted ? " (muted)" : ""}${p.speaking ? " — speaking" : ""}`;
      const badges = el.querySelector(".badges")!;
      badges.replaceChildren(
        h("span", { class: `badge e2ee ${p.e2ee}` }, E2EE_TEXT[p.e2ee]),
        h("span", { class: "badge transport" }, p.media?.transport === "sfu" ? "SFU" : p.media?.transport === "mesh" ? "mesh" : "connecting"),
      );
      el.querySelector(".tile-message")!.textContent =
        p.e2ee === "undecryptable"
          ? "This participant's media cannot be decrypted."
          : p.media?.videoMuted
            ? "Camera off"
            : !p.media
              ? "Connecting…"
              : "";
      el.dataset.e2ee = p.e2ee;
    }
    for (const [id, el] of tileEls) {
      if (!seen.has(id)) {
        el.remove();
        tileEls.delete(id);
      }
    }
    if (!statsPanel.hidden) {
      const rows = call.participants.map((p) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, p.name),
          h("td", {}, p.media?.transport ?? "—"),
          h("td", {}, p.stats ? p.stats.kbps.toFixed(0) : "—"),
          h("td", {}, p.stats ? p.stats.fps.toFixed(0) : "—"),
          h("td", {}, p.stats ? String(p.stats.packetsLost) : "—"),
          h("td", {}, p.stats ? String(p.stats.framesDecoded) : "—"),
          h("td", {}, p.keyIndex === undefined ? "none" : String(p.keyIndex)),
        ),
      );
      const own = call.own ? call.keys.latestIndex(call.own.rtcBackendIdentity) : undefined;
      statsPanel.replaceChildren(
        h("p", {}, `Transport: ${call.kind ?? "—"} · own key index: ${own ?? "none"} · switches: ${call.switches.length}`),
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, ...["Participant", "Transport", "kbit/s", "fps", "Packets lost", "Frames decoded", "Key index"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, ...rows),
        ),
      );
    }
  };
  call.listeners.add(render);
  show(
    h(
      "section",
      { class: "call", "aria-labelledby": "call-title" },
      h("header", { class: "row" }, h("h1", { id: "call-title" }, room.name || room.roomId), transportBadge, h("span", { class: "badge" }, room.hasEncryptionStateEvent() ? "End-to-end encrypted" : "Not encrypted")),
      errorBox,
      h("div", { class: "stage" }, selfTile, tiles),
      h("nav", { class: "controls", "aria-label": "Call controls" }, mic, cam, screen, statsBtn, leave),
      statsPanel,
    ),
  );
  call.join();
  render();
}

// ---- test and debugging hooks -------------------------------------------------------------

/**
 * Mean and spread of the picture a tile's track delivers now (a decoded, decrypted frame is not
 * flat). Read from the track itself (ImageCapture), so a page in the background, whose <video>
 * elements are not painted, is measured too.
 */
async function sampleTile(identity: string): Promise<{ width: number; height: number; mean: number[]; std: number } | null> {
  const video = document.querySelector<HTMLVideoElement>(`.tile[data-identity="${CSS.escape(identity)}"] video`);
  const track = (video?.srcObject as MediaStream | null)?.getVideoTracks()[0];
  if (!video || !track) return null;
  let source: CanvasImageSource = video;
  let width = video.videoWidth;
  let height = video.videoHeight;
  const Capture = (globalThis as unknown as { ImageCapture?: new (t: MediaStreamTrack) => { grabFrame(): Promise<ImageBitmap> } }).ImageCapture;
  if (Capture) {
    try {
      const bitmap = await new Capture(track).grabFrame();
      source = bitmap;
      width = bitmap.width;
      height = bitmap.height;
    } catch {
      /* fall back to the element */
    }
  }
  if (!width) return null;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true })!;
  ctx.drawImage(source, 0, 0);
  const { data } = ctx.getImageData(0, 0, width, height);
  const sum = [0, 0, 0];
  let sq = 0;
  const n = data.length / 4;
  for (let i = 0; i < data.length; i += 4) {
    sum[0] += data[i];
    sum[1] += data[i + 1];
    sum[2] += data[i + 2];
    const y = (data[i] + data[i + 1] + data[i + 2]) / 3;
    sq += y * y;
  }
  const mean = sum.map((x) => x / n);
  const m = (mean[0] + mean[1] + mean[2]) / 3;
  return { width, height, mean, std: Math.sqrt(Math.max(0, sq / n - m * m)) };
}

Object.assign(window, {
  mrtc: {
    state,
    snapshot: () => state.call?.snapshot() ?? null,
    sampleTile,
  },
});

// ---- start --------------------------------------------------------------------------------

async function main(): Promise<void> {
  const loginToken = params.get("loginToken");
  try {
    if (loginToken) {
      const base = localStorage.getItem("mrtc.hs");
      history.replaceState(null, "", location.pathname);
      if (!base) throw new UserFacingError("Single sign-on returned, but the homeserver is unknown. Log in again.");
      await enter(await tokenLogin(base, loginToken));
      return;
    }
    const stored = loadSession();
    if (stored) {
      await enter(stored);
      return;
    }
    loginScreen();
  } catch (e) {
    forgetSession();
    loginScreen(describe(e));
  }
}

window.addEventListener("unhandledrejection", (ev) => {
  console.error("unhandled", ev.reason);
});

void main();
