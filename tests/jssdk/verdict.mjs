// js-sdk's own verdict on MatrixRTC membership events (issue 12 property tests).
//
// Reads one JSON request per line on stdin and answers one JSON line on stdout:
//   request:  {"id": n, "event": <client-format event>, "now": <ms>}
//   answer:   {"id": n, "parsed": bool, "accepted": bool, "transport": <object|null>,
//              "identity": <string|null>, "slot_id": <string|null>, "error": <string|null>}
// "parsed" is whether CallMembership.parseFromEvent (checkRtcMembershipData /
// checkSessionsMembershipData) takes the event.
// "accepted" is what matrix-js-sdk's MatrixRTCSession.sessionMembershipsForSlot (collect,
// quick filter, CallMembership.parseFromEvent, slot / expiry / room-membership checks) makes of
// a room whose only call event is this one, for the slot m.call#ROOM, with Date.now() = now and
// the sender joined. Nothing is reimplemented here: the room is a minimal stand-in exposing
// the four accessors the SDK reads.
import readline from "node:readline";
import { MatrixEvent } from "matrix-js-sdk";
import { MatrixRTCSession } from "matrix-js-sdk/lib/matrixrtc/MatrixRTCSession.js";
import { CallMembership } from "matrix-js-sdk/lib/matrixrtc/CallMembership.js";

const SLOT = { application: "m.call", id: "ROOM" };
const realNow = Date.now;

function roomWith(raw) {
  const ev = new MatrixEvent(raw);
  const isState = typeof raw.state_key === "string";
  const state = {
    getStateEvents(type, key) {
      const all = isState && raw.type === type ? [ev] : [];
      if (key === undefined) return all;
      return all.find((e) => e.getStateKey() === key) ?? null;
    },
  };
  return {
    roomId: "!verdict:example.org",
    _unstable_getStickyEvents: () => (isState ? [] : [ev]),
    getLiveTimeline: () => ({ getState: () => state }),
    hasMembershipState: (userId, membership) => userId === raw.sender && membership === "join",
  };
}

async function parsed(raw) {
  try {
    await CallMembership.parseFromEvent(new MatrixEvent(raw));
    return true;
  } catch {
    return false;
  }
}

// Where the member publishes; js-sdk throws (reads foci_preferred[0] of undefined) when a
// state-form member has no foci_preferred: that is "nowhere" too.
function transportOf(m) {
  try {
    return m.getTransport(m) ?? null;
  } catch {
    return null;
  }
}

async function verdict(req) {
  Date.now = () => req.now;
  const ok = await parsed(req.event);
  try {
    const members = await MatrixRTCSession.sessionMembershipsForSlot(roomWith(req.event), SLOT);
    const m = members[0];
    return {
      id: req.id,
      parsed: ok,
      accepted: members.length === 1,
      transport: m ? transportOf(m) : null,
      identity: m ? m.rtcBackendIdentity : null,
      slot_id: m ? m.slotId : null,
      error: null,
    };
  } catch (e) {
    return { id: req.id, parsed: ok, accepted: false, transport: null, identity: null, slot_id: null,
             error: String(e) };
  } finally {
    Date.now = realNow;
  }
}

// The SDK logs every rejection through loglevel on stdout/stderr; keep stdout for answers.
console.log = console.info = console.debug = console.warn = console.error = () => {};
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const rl = readline.createInterface({ input: process.stdin });
let chain = Promise.resolve();
rl.on("line", (line) => {
  chain = chain.then(async () => out(await verdict(JSON.parse(line))));
});
out({ ready: true });
