// The mesh/SFU choice, the same rule as the Python agent (matrixrtc/session/media_policy.py):
// mesh when every active member advertises the full-mesh transport and either nobody advertises
// a LiveKit transport or the call has at most `meshMax` members; SFU when someone offers one;
// nothing otherwise. It reads only the membership list, so every member decides the same.
// `sfuReachable` false (our SFU connection was lost and no probe has got through since): a call
// whose members can all mesh goes to the mesh at any size (every member on that SFU sees it
// fail, so all fall back together); with a member that cannot mesh it stays on the SFU.
export const MESH_TRANSPORT_TYPE = "org.matrix.msc3401.full_mesh";

export type MediaKind = "mesh" | "sfu" | "none";

export interface AdvertisedTransport {
  type: string;
  [key: string]: unknown;
}

export function chooseMedia(
  members: ReadonlyArray<ReadonlyArray<AdvertisedTransport>>,
  meshMax = 4,
  sfuReachable = true,
): MediaKind {
  if (members.length === 0) return "none";
  const allMesh = members.every((ts) => ts.some((t) => t.type === MESH_TRANSPORT_TYPE));
  const anySfu = members.some((ts) => ts.some((t) => t.type === "livekit"));
  if (allMesh && (!anySfu || !sfuReachable || members.length <= meshMax)) return "mesh";
  if (anySfu) return "sfu";
  return "none";
}
