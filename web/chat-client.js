/**
 * chat-client.js: a dependency-free client for the handler's WebSocket protocol (PROTOCOL.md).
 *
 * Lift this file into your own front end: it has no DOM code and no framework. It keeps one
 * WebSocket open, reconnects when it drops, keeps it alive, refreshes the token in-band, and
 * makes sends safe to retry. Your UI listens to events and calls a handful of methods:
 *
 *   const client = new ChatClient({ url: "/ws", token, getToken });
 *   client.addEventListener("message", (event) => show(event.detail));
 *   client.start();
 *   client.sendMessage({ chatId, recipientId, content });
 *
 * Theory of operation
 * -------------------
 * States: "idle" -> "connecting" (socket opening) -> "open" (socket open, not yet bound to a user)
 * -> "online" (the server said `authenticated`). When the socket closes for any reason the client
 * goes to "waiting" and reconnects after an exponential backoff with jitter; "stopped" is final.
 *
 * Binding: the token rides on the upgrade request (`/ws?token=...`). The server answers
 * `authenticated`, then the backlog (`new_chats`, `new_messages`) of everything this user missed.
 * If the server says `unauthorized` before binding and a `getToken` callback was given, the client
 * fetches a fresh token and binds in-band by sending it in a `ping`; otherwise it stops and emits
 * `auth-failed`, because retrying a bad token would only loop.
 *
 * Sends: every `send_message` carries a `client_message_id`. The frame stays in the outbox until
 * the server's own copy of the `message` (the acknowledgement) comes back. Whatever is in the
 * outbox when the client comes online is (re)sent; the server stores a resend with the same
 * `client_message_id` only once, so a retry after a reconnect never duplicates a message.
 * Other requests made while offline are queued and sent once, in order, on the next bind.
 *
 * Liveness: a `ping` every 25 s keeps the server's idle timeout (60 s) from closing the socket;
 * if the `pong` is not back within `pongTimeoutMs`, the socket is presumed dead and replaced.
 * Tokens with an `exp` claim are refreshed `refreshMarginMs` before expiry by sending the new
 * token in a `ping`, the protocol's in-band refresh.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 *   "state"          {state, previous, attempt, delayMs}    connection state changes
 *   "frame"          {direction: "in" | "out", text, frame, at}   every frame on the wire
 *   "authenticated", "all_chats", "new_chats", "all_messages", "new_messages", "message",
 *   "pong", "error"  the server frame of that type, as parsed JSON
 *   "outbox"         {entry}   a send changed state: "queued", "sending", "sent" or "failed"
 *   "auth-failed"    {message}   the token was refused and cannot be refreshed: sign in again
 */

/** Server frame types this client turns into events of the same name. */
export const SERVER_FRAME_TYPES = Object.freeze([
  "authenticated",
  "all_chats",
  "new_chats",
  "all_messages",
  "new_messages",
  "message",
  "pong",
  "error",
]);

/** Error codes after which resending the same frame cannot succeed. */
const FINAL_ERROR_CODES = new Set([
  "bad_json",
  "bad_request",
  "unknown_type",
  "forbidden",
  "not_found",
  "too_large",
  "unauthorized",
]);

const DEFAULT_OPTIONS = Object.freeze({
  pingIntervalMs: 25_000,
  pongTimeoutMs: 10_000,
  backoffBaseMs: 500,
  backoffMaxMs: 15_000,
  refreshMarginMs: 60_000,
  minRefreshMs: 30_000,
  maxInternalRetries: 3,
});

/**
 * Reconnect delay for the given attempt (0-based): exponential, capped, with "equal jitter".
 * Half the delay is fixed so a client never hammers a server that is down; the other half is
 * random so that thousands of clients dropped by one restart do not all return at once.
 */
export function backoffDelay(attempt, baseMs, maxMs, random = Math.random) {
  const ceiling = Math.min(maxMs, baseMs * 2 ** attempt);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** A random id for `client_message_id`; works outside secure contexts too. */
export function newId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * The claims of a JWT, decoded but NOT verified (only the server can verify). The client reads
 * `sub` to know who it is and `exp` to know when to refresh, and trusts them for nothing else.
 */
export function jwtClaims(token) {
  try {
    const base64 = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const binary = atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "="));
    const claims = JSON.parse(
      new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))),
    );
    return claims && typeof claims === "object" ? claims : {};
  } catch {
    return {};
  }
}

/** The WebSocket URL for `path` (default "/ws") relative to the page, with the token. */
export function webSocketUrl(path, token, base = globalThis.location?.href) {
  const url = new URL(path, base);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

/**
 * Ask a server with `auth.dev_tokens` enabled for a token. Development only: a real deployment
 * gets its JWTs from its own identity provider. Rejects with a readable message otherwise.
 */
export async function fetchDevToken(userId, base = globalThis.location?.href) {
  const response = await fetch(new URL("/auth/dev-token", base), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: userId }),
  });
  if (response.status === 404) {
    throw new Error(
      "This server does not hand out dev tokens (auth.dev_tokens is off). Paste a JWT.",
    );
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok || typeof body.token !== "string") {
    throw new Error(body.message || `Dev token request failed (HTTP ${response.status})`);
  }
  return body.token;
}

export class ChatClient extends EventTarget {
  #path;
  #token;
  #getToken;
  #options;
  #WebSocket;
  #socket = null;
  #state = "idle";
  #userId = null;
  #attempt = 0;
  #requestSeq = 0;
  #queue = []; // non-message frames waiting for the next bind, in order
  #outbox = new Map(); // client_message_id -> entry, until the server acknowledges it
  #timers = { reconnect: null, ping: null, pongDeadline: null, refresh: null };
  #refreshingAuth = false;

  /**
   * @param {object} options
   * @param {string} [options.url="/ws"]  the endpoint, absolute or relative to the page
   * @param {string} options.token  a JWT whose `sub` is the user
   * @param {() => Promise<string>} [options.getToken]  returns a fresh token; enables refresh
   * @param {typeof WebSocket} [options.WebSocket]  for tests or non-browser runtimes
   */
  constructor({
    url = "/ws",
    token,
    getToken = null,
    WebSocket: Socket = globalThis.WebSocket,
    ...rest
  }) {
    super();
    this.#path = url;
    this.#token = token;
    this.#getToken = getToken;
    this.#WebSocket = Socket;
    this.#options = { ...DEFAULT_OPTIONS, ...rest };
  }

  /** One of "idle", "connecting", "open", "online", "waiting", "stopped". */
  get state() {
    return this.#state;
  }

  /** The user the server bound this connection to (from `authenticated`), or null. */
  get userId() {
    return this.#userId;
  }

  /** Messages not acknowledged yet, oldest first. */
  get outbox() {
    return [...this.#outbox.values()];
  }

  /** Connect and stay connected until `stop()`. */
  start() {
    if (this.#state === "idle" || this.#state === "stopped") this.#connect();
  }

  /** Close for good; pending sends stay in `outbox` but are not retried. */
  stop() {
    this.#clearTimers();
    this.#setState("stopped");
    const socket = this.#socket;
    this.#socket = null;
    if (socket) socket.close(1000, "client stopped");
  }

  /** Give the client a new token: used on the next connect and sent in-band right away. */
  setToken(token) {
    this.#token = token;
    this.#scheduleRefresh();
    if (this.#state === "online" || this.#state === "open") this.#write({ type: "ping", token });
  }

  /** Create (or find) the 1:1 chat with `recipientId`; the reply is a `new_chats` frame. */
  createChat(recipientId) {
    return this.#request({ type: "create_chat", recipient_id: recipientId });
  }

  /**
   * Send a message. Returns the outbox entry; its `state` goes "queued"/"sending" -> "sent"
   * (the server stored it and echoed it back) or "failed" (the server refused it for good).
   */
  sendMessage({ chatId, recipientId, content, clientMessageId = newId() }) {
    const entry = {
      clientMessageId,
      requestId: this.#nextRequestId(),
      frame: {
        type: "send_message",
        chat_id: chatId,
        recipient_id: recipientId,
        content,
        client_message_id: clientMessageId,
      },
      state: "queued",
      createdAt: new Date(),
      message: null,
      error: null,
      internalRetries: 0,
    };
    entry.frame.request_id = entry.requestId;
    this.#outbox.set(clientMessageId, entry);
    if (this.#state === "online") this.#transmit(entry);
    if (entry.state === "queued") this.#emit("outbox", { entry });
    return entry;
  }

  /** Every chat of the user, then one `all_messages` per chat with its latest messages. */
  fetchChats({ limit } = {}) {
    return this.#request({ type: "fetch_chats", ...(limit ? { limit } : {}) });
  }

  /** One page of a chat's history older than message id `before` (or the newest). */
  fetchMessages(chatId, { before, limit } = {}) {
    const frame = { type: "fetch_messages", chat_id: chatId };
    if (before) frame.before = before;
    if (limit) frame.limit = limit;
    return this.#request(frame);
  }

  /** Send a raw frame object as is (for tools and experiments); returns false when offline. */
  sendRaw(frame) {
    return this.#write(frame);
  }

  // ------------------------------------------------------------------ connection lifecycle

  #connect() {
    this.#clearTimers();
    this.#setState("connecting");
    let socket;
    try {
      socket = new this.#WebSocket(webSocketUrl(this.#path, this.#token));
    } catch (error) {
      this.#scheduleReconnect();
      return;
    }
    this.#socket = socket;
    socket.addEventListener("open", () => {
      if (socket !== this.#socket) return;
      this.#setState("open");
      this.#startPinging();
    });
    socket.addEventListener("message", (event) => {
      if (socket === this.#socket) this.#receive(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (socket !== this.#socket) return; // a socket we already replaced
      this.#socket = null;
      this.#userId = null;
      this.#onClose(event);
    });
  }

  async #onClose(event) {
    this.#clearTimers();
    for (const entry of this.#outbox.values()) {
      if (entry.state === "sending") this.#changeEntry(entry, "queued");
    }
    if (this.#state === "stopped") return;
    // 1008 is the server's policy close: auth timeout, idle timeout or an expired token.
    // A fresh token, when we can get one, is what makes the next attempt succeed.
    if (event.code === 1008 && this.#tokenExpired()) {
      if (!(await this.#refreshToken())) {
        this.#authFailed("The session token expired. Sign in again.");
        return;
      }
    }
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    const delayMs = backoffDelay(
      this.#attempt,
      this.#options.backoffBaseMs,
      this.#options.backoffMaxMs,
    );
    this.#attempt += 1;
    this.#setState("waiting", { delayMs });
    this.#timers.reconnect = setTimeout(() => this.#connect(), delayMs);
  }

  #onAuthenticated(frame) {
    this.#userId = frame.user_id;
    this.#attempt = 0;
    this.#setState("online");
    this.#scheduleRefresh();
    const queued = this.#queue.splice(0);
    for (const frame of queued) this.#write(frame);
    for (const entry of this.#outbox.values()) {
      if (entry.state === "queued") this.#transmit(entry);
    }
  }

  // ------------------------------------------------------------------ frames

  #receive(text) {
    let frame = null;
    try {
      frame = JSON.parse(text);
    } catch {
      // Not JSON: still shown in the frame log, otherwise ignored.
    }
    this.#emit("frame", { direction: "in", text, frame, at: new Date() });
    if (!frame || typeof frame !== "object") return;
    this.#clearPongDeadline(); // any frame proves the connection is alive
    switch (frame.type) {
      case "authenticated":
        this.#onAuthenticated(frame);
        break;
      case "message":
        this.#onMessage(frame);
        break;
      case "error":
        this.#onError(frame);
        break;
      default:
        break;
    }
    // Unknown types are ignored, as the protocol asks of clients.
    if (SERVER_FRAME_TYPES.includes(frame.type)) this.#emit(frame.type, frame);
  }

  #onMessage(frame) {
    const entry = frame.client_message_id && this.#outbox.get(frame.client_message_id);
    if (entry && frame.sender_id === this.#userId) {
      this.#outbox.delete(entry.clientMessageId);
      entry.message = frame;
      this.#changeEntry(entry, "sent");
    }
  }

  async #onError(frame) {
    const entry = this.#entryForRequest(frame.request_id);
    if (frame.code === "unauthorized" && this.#state === "open") {
      await this.#retryBinding(frame);
    } else if (entry && frame.code === "rate_limited") {
      this.#changeEntry(entry, "queued");
      setTimeout(
        () => this.#state === "online" && this.#transmit(entry),
        frame.retry_after_ms ?? 1000,
      );
    } else if (
      entry &&
      frame.code === "internal" &&
      entry.internalRetries < this.#options.maxInternalRetries
    ) {
      entry.internalRetries += 1;
      this.#changeEntry(entry, "queued");
      setTimeout(
        () => this.#state === "online" && this.#transmit(entry),
        1000 * entry.internalRetries,
      );
    } else if (entry && (FINAL_ERROR_CODES.has(frame.code) || frame.code === "internal")) {
      this.#outbox.delete(entry.clientMessageId);
      entry.error = frame;
      this.#changeEntry(entry, "failed");
    }
  }

  /** The token on the upgrade was refused: get a fresh one and bind in-band, once. */
  async #retryBinding(frame) {
    if (this.#refreshingAuth) return;
    this.#refreshingAuth = true;
    try {
      if (this.#getToken && (await this.#refreshToken())) {
        this.#write({ type: "ping", token: this.#token });
        return;
      }
      this.#authFailed(frame.message || "The server refused the token.");
    } finally {
      this.#refreshingAuth = false;
    }
  }

  #request(frame) {
    frame.request_id = this.#nextRequestId();
    if (this.#state === "online") this.#write(frame);
    else this.#queue.push(frame);
    return frame.request_id;
  }

  #transmit(entry) {
    if (this.#write(entry.frame)) this.#changeEntry(entry, "sending");
  }

  #write(frame) {
    const socket = this.#socket;
    if (!socket || socket.readyState !== this.#WebSocket.OPEN) return false;
    const text = JSON.stringify(frame);
    socket.send(text);
    this.#emit("frame", { direction: "out", text, frame, at: new Date() });
    return true;
  }

  #entryForRequest(requestId) {
    if (requestId === undefined || requestId === null) return null;
    for (const entry of this.#outbox.values()) {
      if (entry.requestId === requestId) return entry;
    }
    return null;
  }

  #nextRequestId() {
    this.#requestSeq += 1;
    return `r${this.#requestSeq}`;
  }

  #changeEntry(entry, state) {
    entry.state = state;
    this.#emit("outbox", { entry });
  }

  // ------------------------------------------------------------------ keep-alive and tokens

  #startPinging() {
    clearInterval(this.#timers.ping);
    this.#timers.ping = setInterval(() => {
      if (!this.#write({ type: "ping" })) return;
      if (this.#timers.pongDeadline === null) {
        this.#timers.pongDeadline = setTimeout(
          () => this.#replaceDeadSocket(),
          this.#options.pongTimeoutMs,
        );
      }
    }, this.#options.pingIntervalMs);
  }

  #clearPongDeadline() {
    clearTimeout(this.#timers.pongDeadline);
    this.#timers.pongDeadline = null;
  }

  /** No answer to a ping: the TCP connection is gone without a close (sleep, network change). */
  #replaceDeadSocket() {
    const socket = this.#socket;
    if (!socket) return;
    this.#socket = null;
    this.#userId = null;
    socket.close(4000, "pong timeout");
    this.#onClose({ code: 4000 });
  }

  #tokenExpired() {
    const { exp } = jwtClaims(this.#token ?? "");
    return typeof exp === "number" && exp * 1000 <= Date.now();
  }

  #scheduleRefresh() {
    clearTimeout(this.#timers.refresh);
    this.#timers.refresh = null;
    const { exp } = jwtClaims(this.#token ?? "");
    if (typeof exp !== "number" || !this.#getToken) return;
    // The floor matters when this device's clock runs ahead of the token issuer's: every fresh
    // token would look nearly expired, and an unbounded timer would refresh in a tight loop.
    const inMs = Math.max(
      this.#options.minRefreshMs,
      exp * 1000 - Date.now() - this.#options.refreshMarginMs,
    );
    this.#timers.refresh = setTimeout(async () => {
      // In-band refresh: any frame carrying the new token extends the session; ping is cheapest.
      if ((await this.#refreshToken()) && this.#state === "online") {
        this.#write({ type: "ping", token: this.#token });
      }
      this.#scheduleRefresh();
    }, inMs);
  }

  async #refreshToken() {
    if (!this.#getToken) return false;
    try {
      this.#token = await this.#getToken();
      return true;
    } catch {
      return false;
    }
  }

  #authFailed(message) {
    this.stop();
    this.#emit("auth-failed", { message });
  }

  // ------------------------------------------------------------------ plumbing

  #setState(state, extra = {}) {
    const previous = this.#state;
    this.#state = state;
    this.#emit("state", { state, previous, attempt: this.#attempt, ...extra });
  }

  #clearTimers() {
    clearTimeout(this.#timers.reconnect);
    clearInterval(this.#timers.ping);
    clearTimeout(this.#timers.pongDeadline);
    clearTimeout(this.#timers.refresh);
    this.#timers = { reconnect: null, ping: null, pongDeadline: null, refresh: null };
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
