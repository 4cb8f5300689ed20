// Media keys of a call, as matrix-js-sdk's MatrixRTCSession hands them out
// (EncryptionKeyChanged: raw key, index, member, LiveKit/backend identity). One table feeds
// every transport the call runs (the LiveKit key provider and the mesh frame cryptor), also
// transports started later, so a switch never waits for keys.
export interface MediaKey {
  identity: string; // rtcBackendIdentity: LiveKit identity and the mesh cryptor's participant id
  index: number;
  key: Uint8Array;
  userId: string;
  deviceId: string;
  receivedAt: number;
}

export type KeySink = (k: MediaKey) => void;

export class KeyTable {
  private readonly byIdentity = new Map<string, Map<number, MediaKey>>();
  private readonly latest = new Map<string, number>();
  private readonly sinks = new Set<KeySink>();
  /** identity -> Date.now() of the first key received for it. */
  readonly firstAt = new Map<string, number>();

  set(k: MediaKey): void {
    let ring = this.byIdentity.get(k.identity);
    if (!ring) this.byIdentity.set(k.identity, (ring = new Map()));
    ring.set(k.index, k);
    if (!this.firstAt.has(k.identity)) this.firstAt.set(k.identity, k.receivedAt);
    this.latest.set(k.identity, k.index);
    for (const sink of this.sinks) sink(k);
  }

  /** `sink` gets every key held now (oldest first per identity, latest last) and every later one. */
  attach(sink: KeySink): () => void {
    this.sinks.add(sink);
    for (const [identity, ring] of this.byIdentity) {
      const last = this.latest.get(identity);
      for (const k of ring.values()) if (k.index !== last) sink(k);
      if (last !== undefined) sink(ring.get(last)!);
    }
    return () => this.sinks.delete(sink);
  }

  has(identity: string): boolean {
    return this.byIdentity.has(identity);
  }

  latestIndex(identity: string): number | undefined {
    return this.latest.get(identity);
  }
}
