// Drives the web call client (web/dist) in the devstack's Chromium the way a person would:
// log in, pick the room, join from the lobby, wait until every remote participant's video
// decodes, look at the tiles' pixels, use the call controls, leave. Prints one JSON line.
// Usage: node web_client.mjs <devtools_url> <json options>
//   options: base (client URL), homeserver, user, password, roomId, transport, dialect,
//   peers (remote participants expected), minFrames, holdMs, timeoutMs, keyboard (log in and
//   join with the keyboard only), toggleMute (mute and unmute the microphone once),
//   barcodes (read the frame-number barcode of tests/media_samples.py from each remote tile
//   this many times, 150 ms apart, through a canvas), expectKinds (transports the call must move
//   to in turn after the first decoded frames, e.g. ["sfu", "mesh"]), barrier ({dir, name,
//   count}: before leaving, wait until `count` browsers have written their name into `dir`),
//   keyless (the page drops every other member's media key; wait for `minPackets` video
//   packets from each remote instead of decoded frames), rawAudio (the microphone without
//   voice processing), senderStats (return what this browser produced and sent over time),
//   startAfter (a file path: open the page only once it exists), signalJoined (a file path:
//   written once our own membership is back from the homeserver)
import { existsSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const [devtoolsUrl, raw] = process.argv.slice(2);
const o = JSON.parse(raw);
const t0 = Date.now();
const marks = {};
const mark = (name) => (marks[name] = Date.now() - t0);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const browser = await chromium.connectOverCDP(devtoolsUrl);
// A fresh context per client: its own localStorage and IndexedDB (crypto store).
const context = await browser.newContext();
const page = await context.newPage();
if (o.rawAudio) {
  // The microphone as it is: no echo canceller, noise suppressor or gain control. A test
  // that measures what arrives against a known source (a tone file on the fake microphone)
  // needs the source unchanged: with the page playing the other side's tone, the echo
  // canceller takes the microphone's tone for echo of it and cuts beeps short or away.
  const off = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };
  await page.addInitScript((raw) => {
    const md = navigator.mediaDevices;
    const native = md.getUserMedia.bind(md);
    md.getUserMedia = (c) => native(c && c.audio ? { ...c, audio: { ...(c.audio === true ? {} : c.audio), ...raw } } : c);
  }, off);
}
if (o.senderStats) {
  // What this browser sends, as its own getStats sees it, every 250 ms: how much its fake
  // devices produced (media-source: seconds of audio, video frames) and what its encoder sent
  // (outbound-rtp), against the wall clock. Tells a starved sender from a lossy path or a
  // recorder that loses time.
  await page.addInitScript(() => {
    const pcs = [];
    const Native = window.RTCPeerConnection;
    window.RTCPeerConnection = function (...args) {
      const pc = new Native(...args);
      pcs.push(pc);
      return pc;
    };
    window.RTCPeerConnection.prototype = Native.prototype;
    Object.setPrototypeOf(window.RTCPeerConnection, Native);
    const samples = [];
    window.__senderStats = samples;
    // Per connection: a mesh may hold two for a moment (glare), each with its own counters.
    setInterval(async () => {
      const row = { at: Date.now(), pcs: {} };
      for (const [i, pc] of pcs.entries()) {
        if (pc.connectionState === "closed") continue;
        const report = await pc.getStats().catch(() => null);
        const c = {};
        for (const s of report?.values() ?? []) {
          if (s.type === "media-source" && s.kind === "audio") c.audioSourceS = s.totalSamplesDuration;
          if (s.type === "media-source" && s.kind === "video") c.videoSourceFrames = s.frames;
          if (s.type === "outbound-rtp" && s.kind === "audio") c.audioPackets = s.packetsSent;
          if (s.type === "outbound-rtp" && s.kind === "video") c.videoFramesSent = s.framesSent;
        }
        // (a counter is undefined until its first frame: such a row is left out)
        if (typeof c.audioSourceS === "number" && typeof c.videoSourceFrames === "number") row.pcs[i] = c;
      }
      if (Object.keys(row.pcs).length) samples.push(row);
    }, 250);
  });
}
const consoleLines = [];
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") consoleLines.push(`${m.type()}: ${m.text()}`.slice(0, 300));
});
page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

// In the page: the 12-block barcode in the top 16 rows of a remote tile's current picture
// (tests/media_samples.py: 11 bits of frame number, the last block always white), or null.
function readBarcode(identity) {
  const video = document.querySelector(`.tile[data-identity="${CSS.escape(identity)}"] video`);
  if (!video || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0);
  const w = canvas.width;
  const block = Math.floor(w / 12);
  const rows = Math.max(1, Math.round((16 * canvas.height) / 240));
  let n = 0;
  const means = [];
  for (let bit = 0; bit < 12; bit++) {
    const x0 = bit * block + Math.ceil(block / 8);
    const cw = Math.max(1, block - 2 * Math.ceil(block / 8));
    const { data } = ctx.getImageData(x0, Math.floor(rows / 8), cw, Math.max(1, rows - 2 * Math.floor(rows / 8)));
    let sum = 0;
    for (let i = 0; i < data.length; i += 4) sum += 0.299 * data[i] + 0.587 * data[i + 1] + 0.114 * data[i + 2];
    const mean = sum / (data.length / 4);
    means.push(Math.round(mean));
    if (mean > 60 && mean < 190) return { n: null, width: w, height: canvas.height, means };
    if (mean >= 190) n |= 1 << bit;
  }
  if (!(n >> 11)) return { n: null, width: w, height: canvas.height, means };
  return { n: n & 2047, width: w, height: canvas.height };
}

let result = { ok: false };
try {
  const url = `${o.base}/index.html?hs=${encodeURIComponent(o.homeserver)}&transport=${o.transport}&dialect=${o.dialect}` +
    (o.meshMax ? `&mesh_max=${o.meshMax}` : "") + (o.keyless ? "&keyless=1" : "") + (o.query ?? "");
  if (o.startAfter) {
    const until = Date.now() + 60000;
    while (!existsSync(o.startAfter)) {
      if (Date.now() > until) throw new Error(`${o.startAfter} did not appear within 60 s`);
      await sleep(100);
    }
  }
  await page.goto(url);
  await page.waitForSelector("#user");
  mark("page");
  if (o.keyboard) {
    // Focus starts in the user name field (the homeserver came with the URL).
    await page.keyboard.type(o.user);
    await page.keyboard.press("Tab");
    await page.keyboard.type(o.password);
    await page.keyboard.press("Enter");
  } else {
    await page.fill("#user", o.user);
    await page.fill("#password", o.password);
    await page.click("button[type=submit]");
  }
  const room = page.locator(`button.room[data-room-id="${o.roomId}"]`);
  await room.waitFor({ timeout: 30000 });
  mark("rooms");
  if (o.keyboard) {
    await room.focus();
    await page.keyboard.press("Enter");
  } else {
    await room.click();
  }
  await page.waitForSelector("#join:not([disabled])", { timeout: 20000 });
  mark("lobby");
  if (o.keyboard) {
    await page.focus("#join");
    await page.keyboard.press("Enter");
  } else {
    await page.click("#join");
  }
  mark("join");
  // Every control in the call view has an accessible name.
  const unnamed = await page.evaluate(() =>
    [...document.querySelectorAll("button, input, select")]
      .filter((el) => {
        const label = el.getAttribute("aria-label") || el.textContent?.trim() || (el.id && document.querySelector(`label[for="${el.id}"]`)?.textContent) || el.closest("label")?.textContent?.trim();
        return !label;
      })
      .map((el) => el.outerHTML.slice(0, 80)),
  );
  let snap = null;
  const deadline = Date.now() + o.timeoutMs;
  let unreadableSince = null;
  while (Date.now() < deadline) {
    snap = await page.evaluate(() => window.mrtc.snapshot());
    if (o.signalJoined && snap?.ownMembershipMs != null && !existsSync(o.signalJoined)) writeFileSync(o.signalJoined, "");
    // A member whose sticky membership this device cannot decrypt is one it never sees (and
    // never sends its key to): say so after a while instead of waiting out the timeout.
    if (snap?.unreadableMemberships?.length) {
      unreadableSince ??= Date.now();
      if (Date.now() - unreadableSince > 20000) {
        throw new Error(`memberships this device cannot decrypt for 20 s: ${JSON.stringify(snap.unreadableMemberships)}`);
      }
    } else {
      unreadableSince = null;
    }
    const ps = snap?.participants ?? [];
    // keyless (a page without the others' keys): wait for their video packets instead.
    const decoded = o.keyless
      ? (p) => (p.stats?.videoPackets ?? 0) >= o.minPackets
      : (p) => (p.stats?.framesDecoded ?? 0) >= o.minFrames && (!o.quick || p.firstFrameMs !== null);
    if (ps.length >= o.peers && ps.every(decoded)) break;
    await sleep(250);
  }
  mark("decoded");
  // expectKinds: the call must then move to each of these transports in turn (live switches
  // driven by who joins and leaves), with every remote participant's video decoding on it.
  const phases = [];
  for (const kind of o.expectKinds ?? []) {
    const until = Date.now() + o.timeoutMs;
    let reached = false;
    while (Date.now() < until && !reached) {
      snap = await page.evaluate(() => window.mrtc.snapshot());
      const ps = snap?.participants ?? [];
      reached = snap?.kind === kind && ps.length >= 1 && ps.every((p) => p.transport === kind && (p.stats?.framesDecoded ?? 0) >= 10);
      if (!reached) await sleep(200);
    }
    phases.push({ kind, reached, at: Date.now() - t0, participants: (snap?.participants ?? []).length });
  }
  let screen = null;
  if (o.shareScreen) {
    await page.click("#screen");
    await page.waitForFunction(() => document.querySelector("#screen")?.getAttribute("aria-pressed") === "true", null, { timeout: 15000 });
    screen = { sharing: true };
  }
  if (o.expectScreen) {
    // Another participant shares a screen: its tile shows it, decoded.
    const until = Date.now() + 30000;
    while (Date.now() < until) {
      snap = await page.evaluate(() => window.mrtc.snapshot());
      const sharer = (snap?.participants ?? []).find((p) => p.hasScreen);
      if (sharer) {
        await sleep(1500);
        const again = (await page.evaluate(() => window.mrtc.snapshot())).participants.find((p) => p.identity === sharer.identity);
        screen = { from: sharer.name, hasScreen: again.hasScreen, framesDecoded: again.stats?.framesDecoded ?? 0 };
        break;
      }
      await sleep(250);
    }
  }
  const first = snap;
  if (o.quick) {
    // Benchmarks: the figures are in the snapshot; leave at once.
    await page.click("#leave");
    await page.waitForSelector("h1#rooms-title", { timeout: 15000 });
    mark("left");
    result = { ok: true, first, last: first, marks, phases };
  } else {
  // Look at the pictures and the badges while everyone is still in the call.
  const tiles = {};
  for (const p of o.keyless ? [] : first?.participants ?? []) {
    tiles[p.identity] = [await page.evaluate((id) => window.mrtc.sampleTile(id), p.identity)];
    await sleep(400);
    tiles[p.identity].push(await page.evaluate((id) => window.mrtc.sampleTile(id), p.identity));
  }
  let barcodes = null;
  if (o.barcodes) {
    barcodes = {};
    for (const p of first?.participants ?? []) {
      barcodes[p.identity] = [];
      for (let i = 0; i < o.barcodes; i++) {
        barcodes[p.identity].push(await page.evaluate(readBarcode, p.identity));
        await sleep(150);
      }
    }
  }
  const badges = await page.$$eval(".tile[data-identity] .badge", (els) => els.map((e) => e.textContent));
  const last = await page.evaluate(() => window.mrtc.snapshot());
  let muteCheck = null;
  if (o.toggleMute) {
    await page.click("#mic");
    await sleep(300);
    const label = await page.textContent("#mic");
    await page.click("#mic");
    muteCheck = { mutedLabel: label, pressedAfter: await page.getAttribute("#mic", "aria-pressed") };
  }
  await page.click("#stats-toggle");
  await sleep(1200);
  const statsText = await page.textContent("#stats");
  // Stay a while: the other side is still measuring what we send.
  await sleep(o.holdMs);
  if (o.barrier) {
    // Several browsers in one call: nobody leaves before everyone has looked.
    writeFileSync(join(o.barrier.dir, o.barrier.name), "");
    const until = Date.now() + 60000;
    while (Date.now() < until && readdirSync(o.barrier.dir).length < o.barrier.count) await sleep(200);
  }
  await page.click("#leave");
  await page.waitForSelector("h1#rooms-title", { timeout: 15000 });
  mark("left");
  result = { ok: true, first, last, tiles, badges, statsText, muteCheck, unnamed, marks, barcodes, phases, screen };
  }
} catch (e) {
  let snap = null;
  try {
    snap = await page.evaluate(() => window.mrtc?.snapshot?.());
  } catch {}
  const text = await page.textContent("body").catch(() => "");
  result = { ok: false, error: String(e), snap, body: text.slice(0, 1500), marks };
} finally {
  result.console = consoleLines.slice(-40);
  if (o.senderStats) result.senderStats = await page.evaluate(() => window.__senderStats ?? null).catch(() => null);
  console.log(JSON.stringify(result));
  await context.close().catch(() => {});
  await browser.close().catch(() => {});
}
