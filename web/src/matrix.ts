// Login, the stored session and the running MatrixClient (sync, Olm through the Rust crypto).
import {
  AutoDiscovery,
  ClientEvent,
  createClient,
  type MatrixClient,
  MatrixError,
  SyncState,
} from "matrix-js-sdk";

export interface StoredSession {
  homeserver: string;
  userId: string;
  deviceId: string;
  accessToken: string;
}

const STORAGE_KEY = "mrtc.session";

/** A failure a person can act on: the message is shown as is. */
export class UserFacingError extends Error {}

export function loadSession(): StoredSession | null {
  try {
    const raw = localStorage.getItem(STORAGE_KEY);
    return raw ? (JSON.parse(raw) as StoredSession) : null;
  } catch {
    return null;
  }
}

export function forgetSession(): void {
  localStorage.removeItem(STORAGE_KEY);
}

/** The homeserver's base URL from what a person typed: a URL, a server name, or a user id. */
export async function resolveHomeserver(input: string): Promise<string> {
  const text = input.trim().replace(/\/+$/, "");
  if (!text) throw new UserFacingError("Enter the homeserver address.");
  if (/^https?:\/\//i.test(text)) {
    await checkHomeserver(text);
    return text;
  }
  const server = text.startsWith("@") ? text.slice(text.indexOf(":") + 1) : text;
  const cfg = await AutoDiscovery.findClientConfig(server).catch(() => null);
  const hs = cfg?.["m.homeserver"];
  if (hs?.state === AutoDiscovery.SUCCESS && hs.base_url) return hs.base_url;
  const guess = `https://${server}`;
  await checkHomeserver(guess);
  return guess;
}

async function checkHomeserver(base: string): Promise<void> {
  let resp: Response;
  try {
    resp = await fetch(`${base}/_matrix/client/versions`);
  } catch {
    throw new UserFacingError(`The homeserver ${base} cannot be reached. Check the address and your connection.`);
  }
  if (!resp.ok) throw new UserFacingError(`${base} does not answer as a Matrix homeserver (HTTP ${resp.status}).`);
}

/** Which login types the homeserver offers ("password", "sso"). */
export async function loginKinds(base: string): Promise<{ password: boolean; sso: boolean }> {
  const client = createClient({ baseUrl: base });
  try {
    const flows = (await client.loginFlows()).flows.map((f) => f.type);
    return { password: flows.includes("m.login.password"), sso: flows.includes("m.login.sso") };
  } catch {
    throw new UserFacingError(`The homeserver ${base} cannot be reached. Check the address and your connection.`);
  }
}

export function ssoRedirectUrl(base: string, returnTo: string): string {
  return createClient({ baseUrl: base }).getSsoLoginUrl(returnTo, "sso");
}

export async function passwordLogin(base: string, user: string, password: string): Promise<StoredSession> {
  const client = createClient({ baseUrl: base });
  try {
    const resp = await client.loginRequest({
      type: "m.login.password",
      identifier: { type: "m.id.user", user: user.trim() },
      password,
      initial_device_display_name: "matrixrtc web",
    });
    return store({ homeserver: base, userId: resp.user_id, deviceId: resp.device_id, accessToken: resp.access_token });
  } catch (e) {
    if (e instanceof MatrixError && e.errcode === "M_FORBIDDEN") {
      throw new UserFacingError("Wrong user name or password.");
    }
    if (e instanceof MatrixError) throw new UserFacingError(`Login failed: ${e.message}`);
    throw new UserFacingError(`The homeserver ${base} cannot be reached. Check the address and your connection.`);
  }
}

export async function tokenLogin(base: string, token: string): Promise<StoredSession> {
  const client = createClient({ baseUrl: base });
  try {
    const resp = await client.loginRequest({ type: "m.login.token", token });
    return store({ homeserver: base, userId: resp.user_id, deviceId: resp.device_id, accessToken: resp.access_token });
  } catch (e) {
    throw new UserFacingError(`Single sign-on did not complete: ${e instanceof Error ? e.message : e}`);
  }
}

function store(s: StoredSession): StoredSession {
  localStorage.setItem(STORAGE_KEY, JSON.stringify(s));
  return s;
}

/** A started client: Rust crypto (Olm) initialised, first sync done. */
export async function startClient(s: StoredSession): Promise<MatrixClient> {
  const client = createClient({
    baseUrl: s.homeserver,
    userId: s.userId,
    deviceId: s.deviceId,
    accessToken: s.accessToken,
    timelineSupport: false,
  });
  // One crypto store per device: two accounts in one browser profile never share one.
  await client.initRustCrypto({ cryptoDatabasePrefix: `mrtc-${s.userId}-${s.deviceId}` });
  const ready = new Promise<void>((resolve, reject) => {
    const onSync = (state: SyncState, _prev: SyncState | null, data?: { error?: Error }) => {
      if (state === SyncState.Prepared || state === SyncState.Syncing) {
        client.off(ClientEvent.Sync, onSync);
        resolve();
      } else if (state === SyncState.Error) {
        const err = data?.error;
        if (err instanceof MatrixError && err.errcode === "M_UNKNOWN_TOKEN") {
          client.off(ClientEvent.Sync, onSync);
          forgetSession();
          reject(new UserFacingError("Your session has ended. Please log in again."));
        }
      }
    };
    client.on(ClientEvent.Sync, onSync);
  });
  await client.startClient({ initialSyncLimit: 10, lazyLoadMembers: true });
  await ready;
  return client;
}

export async function logout(client: MatrixClient): Promise<void> {
  try {
    await client.logout(true);
  } finally {
    client.stopClient();
    forgetSession();
  }
}
