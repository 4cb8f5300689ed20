// Where this homeserver's calls can use an SFU: MSC4143 `/rtc/transports`, then
// `.well-known/matrix/client` `org.matrix.msc4143.rtc_foci`, then the page's configuration
// (`?livekit_service_url=`), in that order (the Python agent's order, session/transports.py).
import type { MatrixClient } from "matrix-js-sdk";

export interface LivekitFocus {
  type: "livekit";
  livekit_service_url: string;
}

export interface Discovered {
  focus: LivekitFocus | null;
  source: "rtc/transports" | ".well-known" | "configuration" | "none";
}

function firstLivekit(list: unknown): LivekitFocus | null {
  if (!Array.isArray(list)) return null;
  for (const t of list) {
    if (t && typeof t === "object" && (t as { type?: unknown }).type === "livekit") {
      const url = (t as { livekit_service_url?: unknown }).livekit_service_url;
      if (typeof url === "string" && /^https?:\/\//.test(url)) return { type: "livekit", livekit_service_url: url };
    }
  }
  return null;
}

export async function discoverSfu(client: MatrixClient, configured?: string | null): Promise<Discovered> {
  const base = client.getHomeserverUrl().replace(/\/+$/, "");
  try {
    const resp = await fetch(`${base}/_matrix/client/unstable/org.matrix.msc4143/rtc/transports`, {
      headers: { Authorization: `Bearer ${client.getAccessToken()}` },
    });
    if (resp.ok) {
      const body = await resp.json();
      const focus = firstLivekit(body.rtc_transports ?? body.transports);
      if (focus) return { focus, source: "rtc/transports" };
    }
  } catch {
    /* next source */
  }
  try {
    const resp = await fetch(`${base}/.well-known/matrix/client`);
    if (resp.ok) {
      const focus = firstLivekit((await resp.json())["org.matrix.msc4143.rtc_foci"]);
      if (focus) return { focus, source: ".well-known" };
    }
  } catch {
    /* next source */
  }
  if (configured && /^https?:\/\//.test(configured)) {
    return { focus: { type: "livekit", livekit_service_url: configured }, source: "configuration" };
  }
  return { focus: null, source: "none" };
}
