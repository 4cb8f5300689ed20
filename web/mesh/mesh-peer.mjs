// A minimal MatrixRTC full-mesh peer for the browser (callee side), for tests and the web
// client to build on: MSC2746 to-device signalling with plain `fetch` against the homeserver
// (plaintext to-device, as matrix-js-sdk >= v37 sends it), per-sender frame E2EE in LiveKit's
// format through web/e2ee/frame-e2ee.mjs, and sender keys as `io.element.call.encryption_keys`
// to-device messages in clear — only for unencrypted test rooms where plaintext keys were
// explicitly enabled (real clients send them Olm-encrypted).
//
// The caller publishes this device's call membership (state form, with the full-mesh transport
// and a known created_ts) beforehand, and passes the session id the other members derive from
// it: `${member_id}.${created_ts}` (matrixrtc.mesh.matrix_link.mesh_session_id).
import { FrameE2EE } from '../e2ee/frame-e2ee.mjs';

const WORKER = '/node_modules/livekit-client/dist/livekit-client.e2ee.worker.mjs';
const KEYS_TYPE = 'io.element.call.encryption_keys';

function b64(bytes) {
  return btoa(String.fromCharCode(...bytes));
}

function unb64(text) {
  const padded = text + '='.repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

export class MeshPeer {
  /**
   * @param {object} o homeserver, accessToken, userId, deviceId, memberId, sessionId, roomId;
   *   key (16 bytes, base64) and keyIndex: our sender key; installRemoteKeys: false = ignore
   *   every key received (a peer left out of key distribution).
   */
  constructor(o) {
    this.o = o;
    this.identity = `${o.userId}:${o.deviceId}`;
    this.calls = new Map(); // call_id -> { pc, peer, identity }
    this.seq = new Map(); // call_id -> next seq
    this.keysReceived = 0;
    this.keysSentTo = new Set();
    this.log = [];
    this.stopped = false;
  }

  async start() {
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    this.e2ee = new FrameE2EE(new URL(WORKER, location.href));
    await this.e2ee.setKey(this.identity, unb64(this.o.key), this.o.keyIndex);
    this.syncing = this.#syncLoop();
  }

  async stop() {
    this.stopped = true;
    await this.syncing?.catch(() => {});
    for (const { pc } of this.calls.values()) pc.close();
    this.e2ee?.close();
    for (const t of this.stream?.getTracks() ?? []) t.stop();
  }

  async #api(method, path, body) {
    const resp = await fetch(this.o.homeserver + path, {
      method,
      headers: { Authorization: `Bearer ${this.o.accessToken}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(`${method} ${path}: ${resp.status} ${await resp.text()}`);
    return resp.json();
  }

  async #sendToDevice(type, userId, deviceId, content) {
    const txn = `${Date.now()}-${Math.random().toString(36).slice(2)}`;
    await this.#api('PUT', `/_matrix/client/v3/sendToDevice/${encodeURIComponent(type)}/${txn}`, {
      messages: { [userId]: { [deviceId]: content } },
    });
  }

  async #syncLoop() {
    const filter = encodeURIComponent(
      JSON.stringify({ room: { rooms: [] }, presence: { types: [] }, account_data: { types: [] } }),
    );
    let since = null;
    while (!this.stopped) {
      const q = `filter=${filter}&timeout=${since ? 1000 : 0}` + (since ? `&since=${encodeURIComponent(since)}` : '');
      const body = await this.#api('GET', `/_matrix/client/v3/sync?${q}`);
      since = body.next_batch;
      for (const ev of body.to_device?.events ?? []) {
        try {
          await this.#onToDevice(ev);
        } catch (e) {
          this.log.push(`to-device ${ev.type}: ${e}`);
        }
      }
    }
  }

  async #onToDevice(ev) {
    const c = ev.content ?? {};
    if (ev.type === KEYS_TYPE) {
      if (!this.o.installRemoteKeys || c.room_id !== this.o.roomId) return;
      const device = c.member?.claimed_device_id;
      await this.e2ee.setKey(`${ev.sender}:${device}`, unb64(c.keys.key), c.keys.index);
      this.keysReceived += 1;
      return;
    }
    if (!ev.type.startsWith('m.call.')) return;
    if (c.dest_session_id !== this.o.sessionId) return; // not for this session
    if (ev.type === 'm.call.invite') await this.#answer(ev);
    else if (ev.type === 'm.call.hangup') this.#end(c.call_id);
  }

  #envelope(call) {
    const seq = this.seq.get(call.callId) ?? 0;
    this.seq.set(call.callId, seq + 1);
    return {
      call_id: call.callId,
      party_id: this.o.deviceId,
      version: '1',
      conf_id: call.confId,
      device_id: this.o.deviceId,
      sender_session_id: this.o.sessionId,
      dest_session_id: call.peerSession,
      seq,
    };
  }

  async #sendKey(userId, deviceId) {
    const to = `${userId}|${deviceId}`;
    if (this.keysSentTo.has(to)) return;
    this.keysSentTo.add(to);
    await this.#sendToDevice(KEYS_TYPE, userId, deviceId, {
      keys: { index: this.o.keyIndex, key: this.o.key },
      room_id: this.o.roomId,
      member: { id: this.o.memberId, claimed_device_id: this.o.deviceId },
      session: { application: 'm.call', call_id: '', scope: 'm.room' },
      sent_ts: Date.now(),
    });
  }

  async #answer(ev) {
    const c = ev.content;
    for (const [id, old] of this.calls) {
      if (old.peer === `${ev.sender}|${c.device_id}`) this.#end(id); // a new call replaces it
    }
    const call = {
      callId: c.call_id,
      confId: c.conf_id,
      peerSession: c.sender_session_id,
      peer: `${ev.sender}|${c.device_id}`,
      identity: `${ev.sender}:${c.device_id}`,
    };
    // Our key first, so it arrives before our media needs it.
    await this.#sendKey(ev.sender, c.device_id);
    const pc = new RTCPeerConnection({ iceServers: [], bundlePolicy: 'max-bundle', encodedInsertableStreams: true });
    call.pc = pc;
    this.calls.set(call.callId, call);
    pc.ontrack = (t) => {
      this.e2ee.decrypt(t.receiver, { identity: call.identity, trackId: t.track.id, codec: t.track.kind === 'video' ? 'vp8' : 'opus' });
      if (t.track.kind === 'video') {
        const video = document.createElement('video');
        video.muted = true;
        video.autoplay = true;
        video.srcObject = new MediaStream([t.track]);
        document.body.append(video);
      }
    };
    await pc.setRemoteDescription(c.offer);
    for (const track of this.stream.getTracks()) {
      const sender = pc.addTrack(track, this.stream);
      this.e2ee.encrypt(sender, { identity: this.identity, trackId: track.id, codec: track.kind === 'video' ? 'vp8' : 'opus' });
    }
    await pc.setLocalDescription(await pc.createAnswer());
    // No trickle towards aiortc-style peers: the answer carries every candidate.
    await new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') return resolve();
      pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && resolve());
      setTimeout(resolve, 3000);
    });
    const metadata = { [this.stream.id]: { purpose: 'm.usermedia', audio_muted: false, video_muted: false } };
    await this.#sendToDevice('m.call.answer', ev.sender, c.device_id, {
      ...this.#envelope(call),
      answer: { type: 'answer', sdp: pc.localDescription.sdp },
      capabilities: { 'm.call.transferee': false, 'm.call.dtmf': false },
      sdp_stream_metadata: metadata,
      'org.matrix.msc3077.sdp_stream_metadata': metadata,
    });
  }

  #end(callId) {
    const call = this.calls.get(callId);
    if (!call) return;
    call.pc.close();
    this.calls.delete(callId);
  }

  /** Per remote device: video frames decoded, packets received, connection state. */
  async stats() {
    const out = {};
    for (const call of this.calls.values()) {
      const s = { framesDecoded: 0, videoPackets: 0, audioPackets: 0, state: call.pc.connectionState };
      (await call.pc.getStats()).forEach((r) => {
        if (r.type !== 'inbound-rtp') return;
        if (r.kind === 'video') {
          s.framesDecoded += r.framesDecoded ?? 0;
          s.videoPackets += r.packetsReceived ?? 0;
        } else {
          s.audioPackets += r.packetsReceived ?? 0;
        }
      });
      out[call.peer] = s;
    }
    return { peers: out, keysReceived: this.keysReceived, errors: [...this.e2ee.errors], log: this.log };
  }
}
