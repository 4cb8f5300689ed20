// Shared by the npm call-peer pages (hydrogen/, legacy_groupcall/): WebRTC inbound stats of a
// peer connection, playing a remote stream, and the page's stay loop, which posts its stats to
// the test (peer_pages.py) every 250 ms and leaves when the test says so.

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Frames decoded, audio samples rendered and audio packets received on `pc`, added to `out`.
export async function inboundStats(pc, out) {
  const stats = { video: 0, audio: 0, audioPackets: 0, ...out };
  if (!pc) return stats;
  (await pc.getStats()).forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") stats.video += s.framesDecoded ?? 0;
    if (s.kind === "audio") {
      stats.audio += s.totalSamplesReceived ?? 0;
      stats.audioPackets += s.packetsReceived ?? 0;
    }
  });
  return stats;
}

// Remote media must play for Chromium to decode its audio (samples are pulled by playout).
export function play(stream) {
  if (!stream || document.getElementById(`m-${stream.id}`)) return;
  const el = document.createElement("video");
  el.id = `m-${stream.id}`;
  el.autoplay = true;
  el.muted = false;
  el.srcObject = stream;
  document.getElementById("media").appendChild(el);
  el.play().catch(() => {});
}

// Until `limitMs`, `stayMs`, the test's leave, or `done(now, seen)`: render, take
// `snapshot()` (stats keyed `user|device`), report it. Returns the last non-empty snapshot.
export async function stay(o, { render, snapshot, done }) {
  const started = Date.now();
  let last = {};
  const seen = new Set();
  while (Date.now() - started < o.limitMs) {
    render();
    const now = await snapshot();
    Object.keys(now).forEach((k) => seen.add(k));
    if (Object.keys(now).length) last = now;
    let leave = false;
    if (o.progressUrl) {
      try {
        const r = await fetch(o.progressUrl, { method: "POST", body: JSON.stringify({ stats: now }) });
        leave = (await r.json()).leave === true;
      } catch (e) {
        console.warn(`progress report failed: ${e}`);
      }
    }
    if (leave || done?.(now, seen)) break;
    if (o.stayMs && Date.now() - started >= o.stayMs) break;
    await sleep(250);
  }
  return { stats: last, elapsedMs: Date.now() - started };
}
