// What the call view needs from a transport (mesh or SFU): remote media by backend identity,
// receiver statistics, and the local tracks it sends.

export type TransportKind = "mesh" | "sfu";

export interface RemoteMedia {
  identity: string;
  transport: TransportKind;
  video?: MediaStreamTrack;
  audio?: MediaStreamTrack;
  screen?: MediaStreamTrack;
  audioMuted: boolean;
  videoMuted: boolean;
  receivers: () => RTCRtpReceiver[];
  /** Free-form connection state for people ("connecting", "connected", "failed"). */
  state: string;
}

export interface LocalMedia {
  stream: MediaStream; // camera + microphone, the same tracks on every transport
  screen?: MediaStream;
  audioMuted: boolean;
  videoMuted: boolean;
}

export interface MediaTransport {
  readonly kind: TransportKind;
  /** Remote media, keyed by backend identity (LiveKit identity). */
  remotes(): Map<string, RemoteMedia>;
  senders(): RTCRtpSender[];
  /** Mute flags or the screen share changed: tell the peers. */
  localChanged(): Promise<void>;
  close(): Promise<void>;
  /** A human-readable failure, if the transport failed for good. */
  failure?: string;
}

export interface ReceiverStats {
  framesDecoded: number;
  fps: number;
  bytes: number;
  packetsLost: number;
  packetsReceived: number;
  audioLevel: number;
  /** Root mean square level of all audio received so far (totalAudioEnergy / duration). */
  audioRms: number;
  videoPackets: number;
}

export async function receiverStats(receivers: RTCRtpReceiver[]): Promise<ReceiverStats> {
  const out: ReceiverStats = {
    framesDecoded: 0,
    fps: 0,
    bytes: 0,
    packetsLost: 0,
    packetsReceived: 0,
    audioLevel: 0,
    audioRms: 0,
    videoPackets: 0,
  };
  for (const r of receivers) {
    let report: RTCStatsReport;
    try {
      report = await r.getStats();
    } catch {
      continue;
    }
    report.forEach((s: Record<string, unknown> & { type: string }) => {
      if (s.type !== "inbound-rtp") return;
      out.bytes += Number(s.bytesReceived ?? 0);
      out.packetsLost += Number(s.packetsLost ?? 0);
      out.packetsReceived += Number(s.packetsReceived ?? 0);
      if (s.kind === "video") {
        out.framesDecoded += Number(s.framesDecoded ?? 0);
        out.fps = Math.max(out.fps, Number(s.framesPerSecond ?? 0));
        out.videoPackets += Number(s.packetsReceived ?? 0);
      } else if (s.kind === "audio") {
        out.audioLevel = Math.max(out.audioLevel, Number(s.audioLevel ?? 0));
        const duration = Number(s.totalSamplesDuration ?? 0);
        if (duration > 0) out.audioRms = Math.max(out.audioRms, Math.sqrt(Number(s.totalAudioEnergy ?? 0) / duration));
      }
    });
  }
  return out;
}
