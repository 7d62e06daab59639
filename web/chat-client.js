/**
 * chat-client.js: a dependency-free client for the handler's WebSocket protocol (PROTOCOL.md,
 * version 1 and the receipts, unread counts, edits, deletes, group chats, typing, presence and
 * blocking of version 2).
 *
 * Lift this file into your own front end: it has no DOM code and no framework. It keeps one
 * WebSocket open, reconnects when it drops, keeps it alive, refreshes the token in-band, makes
 * sends safe to retry (and, given a `storage`, keeps them across a reload), and keeps a model of
 * every chat that is fed by server frames only. Your UI listens to events and calls methods:
 *
 *   const client = new ChatClient({ url: "/ws", token, getToken, storage: localStorage });
 *   client.addEventListener("change", () => render(client.chatList()));
 *   client.start();
 *   client.openChat(chatId);     // load its history
 *   client.setViewing(chatId);   // it is on screen: mark it read, keep it read
 *   client.sendMessage({ chatId, recipientId, content });   // no recipientId in a group
 *   client.createGroup({ title, memberIds });     // reply: new_chats
 *   client.addMembers(chatId, memberIds);          // reply: chat_updated
 *   client.removeMember(chatId, userId);           // the creator removes; anyone leaves
 *   client.typing(chatId, composer.value !== "");  // on every input; throttled here
 *   client.typists(chatId);      // who is typing there now
 *   client.presence(userId);     // {online, lastSeen} of a contact, or null
 *   client.blockUser(userId);    // reply: blocked; client.isBlocked(userId)
 *
 * Theory of operation
 * -------------------
 * States: "idle" -> "connecting" (socket opening) -> "open" (socket open, not yet bound to a user)
 * -> "online" (the server said `authenticated`). When the socket closes for any reason the client
 * goes to "waiting" and reconnects after an exponential backoff with jitter; "stopped" is final.
 *
 * Binding: the token rides on the upgrade request (`/ws?token=...`). The server answers
 * `authenticated`, then the backlog (`new_chats`, `new_messages`, `updated_messages`) of
 * everything this device missed. If the server says `unauthorized` before binding and a
 * `getToken` callback was given, the client fetches a fresh token and binds in-band by sending it
 * in a `ping`; otherwise it stops and emits `auth-failed`, because retrying a bad token would only
 * loop. Once bound it loads the chat list with counts and marks (`fetch_chats` with `limit: 0`),
 * then the newest page of the chat on screen (`fetch_messages`); other chats load when opened.
 *
 * Sends: every `send_message` carries a `client_message_id`. The frame stays in the outbox until
 * the server's own copy of the `message` (the acknowledgement) comes back. Whatever is in the
 * outbox when the client comes online is (re)sent; the server stores a resend with the same
 * `client_message_id` only once, so a retry after a reconnect or a reload never duplicates a
 * message. Edits and deletes wait in the same outbox until their `message_updated` comes back.
 * With `storage` (anything with getItem/setItem, e.g. `localStorage`) the outbox and the sends the
 * server refused are kept there, so nothing typed is lost by a reload; several tabs may share it.
 * Other requests made while offline are queued and sent once, in order, on the next bind.
 *
 * The chat model: per chat, the messages this client holds by `seq` (always one gapless range
 * that reaches the newest message it knows of), every participant's read and delivered marks,
 * the unread count and the last message. All of it comes from server frames: chat objects
 * (`all_chats`, `new_chats`), `message`, `new_messages`, `all_messages`, `receipt`,
 * `message_updated` and `updated_messages`. Because `seq` has no gaps, the client knows when it
 * holds every message after the user's read mark and then counts the unread ones itself;
 * otherwise it keeps the server's count up to date (one more per new message from someone else)
 * and asks the server again (`fetch_chats` with `limit: 0`) when it cannot tell.
 *
 * Groups: a group is a chat of kind "group" with a title and any number of participants; the
 * same model serves it. Membership changes arrive as `chat_updated` with the chat object in its
 * new state (to the members before and after the change); a chat whose participants no longer
 * include this user was left or the user was removed, and is dropped from the model, as is a
 * chat missing from `all_chats` (the change happened while this device was away).
 * `readers(chatId, message)` lists the other members whose read mark reached a message.
 *
 * Typing: `typing(chatId, active)` may be called on every keystroke. An `active: true` goes out
 * at most once per `typingRenewMs` (3 s) per chat, which renews the indicator on the other side
 * (it lasts 6 s there) for as long as the person keeps typing; an `active: false` only when a
 * `true` went out less than that lifetime ago. Typing is ephemeral: nothing is queued offline,
 * and a refusal (a block is in place) is not an `error` event: typing in that chat pauses for
 * `typingMuteMs` instead. Incoming `typing` frames keep, per chat, the members typing now; each
 * one goes when its `expires_in_ms` passes without a renewal, on `active: false`, when a
 * message from them arrives in that chat, and when the connection drops.
 *
 * Presence: once the chat list is loaded after a bind, the client asks `fetch_presence` for the
 * other side of every direct chat (at most 200 ids a frame), and for each new direct chat as it
 * appears; live `presence` frames update it. `presence(userId)` is null until the server said.
 *
 * Blocking: `fetch_blocked` after every bind; a `blocked` frame (the answer to this client's
 * `block_user`, `unblock_user`, `fetch_blocked`, or sent unasked when another device of the user
 * changed the list) replaces the whole list. The server refuses sends in a direct chat while a
 * block is in place either way; this client only knows the blocks its user made.
 *
 * Liveness: a `ping` every 25 s keeps the server's idle timeout (60 s) from closing the socket;
 * if the `pong` is not back within `pongTimeoutMs`, the socket is presumed dead and replaced.
 * Tokens with an `exp` claim are refreshed `refreshMarginMs` before expiry by sending the new
 * token in a `ping`, the protocol's in-band refresh.
 *
 * Events (all `CustomEvent`s; read `event.detail`):
 *   "state"          {state, previous, attempt, delayMs}    connection state changes
 *   "frame"          {direction: "in" | "out", text, frame, at}   every frame on the wire
 *   "change"         {chatIds}   the model of these chats changed (messages, marks, counts, list)
 *   "authenticated", "all_chats", "new_chats", "all_messages", "new_messages", "message",
 *   "receipt", "message_updated", "updated_messages", "chat_updated", "typing", "presence",
 *   "blocked", "pong", "error"
 *                    the server frame of that type, as parsed JSON, after the model took it in
 *                    (a `change` names the chats a `typing`, `presence` or `blocked` affects,
 *                    and the chat whose typists expired)
 *   "chat-removed"   {chatId, title, kind, left}   the user is no longer in that chat: `left`
 *                    when this client asked to leave it, else removed (or left elsewhere)
 *   "outbox"         {entry}   a send, edit or delete changed state: "queued", "sending",
 *                    "sent" (acknowledged) or "failed" (refused for good; `entry.error`)
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
  "receipt",
  "message_updated",
  "updated_messages",
  "chat_updated",
  "typing",
  "presence",
  "blocked",
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

/** What each error code means, in words a person can act on. */
export const ERROR_SENTENCES = Object.freeze({
  bad_json: "The server could not read a request from this page.",
  bad_request: "The server did not accept that request.",
  unknown_type: "This server does not support that action.",
  unauthorized: "Your sign-in is not valid any more. Sign in again.",
  forbidden: "You are not allowed to do that.",
  not_found: "That chat does not exist (or you are no longer in it).",
  too_large: "That message is too long.",
  rate_limited: "You are sending too fast. Wait a moment and it will go out.",
  internal: "The server had a problem. Try again in a moment.",
});

/** A sentence for an `error` frame (or a `{code}`), never just the raw code. */
export function errorSentence(error) {
  return ERROR_SENTENCES[error?.code] ?? "Something went wrong.";
}

/** The protocol's default `limits.max_message_chars`; characters are Unicode code points. */
export const MAX_MESSAGE_CHARS = 4096;

/** Length in code points, the unit of the server's content limit. */
export function characterCount(text) {
  let count = 0;
  for (const _ of text) count += 1;
  return count;
}

const DEFAULT_OPTIONS = Object.freeze({
  pingIntervalMs: 25_000,
  pongTimeoutMs: 10_000,
  backoffBaseMs: 500,
  backoffMaxMs: 15_000,
  refreshMarginMs: 60_000,
  minRefreshMs: 30_000,
  maxInternalRetries: 3,
  pageSize: 50,
  typingRenewMs: 3_000, // an active typist's `typing` goes out again this often
  typingExpiresMs: 6_000, // the indicator's lifetime when a frame does not say (`expires_in_ms`)
  typingMuteMs: 60_000, // no typing in a chat for this long after the server refused it
  presenceBatch: 200, // user ids per `fetch_presence` (the server's limit)
});

/** Typing request ids remembered for matching a refusal; typing gets no answer otherwise. */
const TYPING_REQUESTS_KEPT = 32;

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

/**
 * Where one of `userId`'s own messages stands for the others of the chat: "read" once every
 * other participant's read mark reached it, "delivered" once every one's delivery mark did
 * (reading implies delivery), else "sent" (the server stored it).
 */
export function receiptStatus(chat, message, userId) {
  const others = chat.participants.filter((user) => user !== userId);
  if (others.length === 0) return "sent";
  const read = (user) => chat.readUpTo[user] ?? 0;
  const delivered = (user) => Math.max(chat.deliveredUpTo[user] ?? 0, read(user));
  if (others.every((user) => read(user) >= message.seq)) return "read";
  if (others.every((user) => delivered(user) >= message.seq)) return "delivered";
  return "sent";
}

/**
 * The other members of a chat whose read mark reached one of `userId`'s messages, sorted: the
 * "read by" of a group message. Members who left are not counted (their marks stay behind).
 */
export function readersOf(chat, message, userId) {
  // A member who joined after the message never saw it: their marks start at their join.
  return chat.participants.filter(
    (user) =>
      user !== userId &&
      (chat.joinedSeq?.[user] ?? 0) < message.seq &&
      (chat.readUpTo[user] ?? 0) >= message.seq,
  );
}

/**
 * User ids typed by a person, separated by commas, semicolons or white space, each trimmed,
 * without duplicates, in the order typed.
 */
export function parseUserIds(text) {
  return [...new Set(String(text ?? "").split(/[\s,;]+/u).filter(Boolean))];
}

/** The message object of a `message` or `message_updated` frame (without type, request_id). */
function messageObject(frame) {
  const { type: _type, request_id: _requestId, ...message } = frame;
  return message;
}

function raise(marks, user, seq) {
  if (typeof user === "string" && Number.isInteger(seq) && seq > (marks[user] ?? 0)) {
    marks[user] = seq;
  }
}

function activityOf(chat) {
  return chat.lastMessage?.timestamp ?? chat.createdAt ?? "";
}

export class ChatClient extends EventTarget {
  #path;
  #token;
  #getToken;
  #options;
  #WebSocket;
  #storage;
  #storageKey;
  #socket = null;
  #state = "idle";
  #userId = null;
  #attempt = 0;
  #requestSeq = 0;
  #queue = []; // non-message frames waiting for the next bind, in order
  #outbox = new Map(); // entry id -> entry, until the server acknowledges it
  #failed = new Map(); // client_message_id -> send the server refused for good
  #chats = new Map(); // chat_id -> chat state (see #chatState)
  #viewing = null; // the chat on screen, which is kept read
  #pending = new Map(); // request_id -> {kind, chatId} of fetches and marks in flight
  #chatsRequest = null; // request_id of the fetch_chats in flight (the server allows one)
  #chatsAgain = false; // ask once more when it is answered
  #changed = new Set(); // chat ids changed while handling the current frame
  #timers = { reconnect: null, ping: null, pongDeadline: null, refresh: null };
  #refreshingAuth = false;
  #leaving = new Map(); // request_id of this user's own remove_member -> chat_id
  #typists = new Map(); // chat_id -> Map user_id -> expiry timer, in the order they started
  #typingSent = new Map(); // chat_id -> when this client last sent `active: true` there
  #typingRequests = new Map(); // request_id of a recent typing frame -> chat_id
  #typingMuted = new Map(); // chat_id -> until when typing there is not sent (refused)
  #presence = new Map(); // user_id -> {online, lastSeen}
  #presenceAsked = new Set(); // user ids asked with fetch_presence since the last bind
  #presenceWanted = new Set(); // direct-chat peers to ask about once the list is loaded
  #listLoaded = false; // an all_chats arrived since the last bind
  #blocked = new Set(); // the user ids this user blocks (from `blocked` frames)

  /**
   * @param {object} options
   * @param {string} [options.url="/ws"]  the endpoint, absolute or relative to the page
   * @param {string} options.token  a JWT whose `sub` is the user
   * @param {() => Promise<string>} [options.getToken]  returns a fresh token; enables refresh
   * @param {Storage} [options.storage]  keeps the outbox across reloads (e.g. `localStorage`)
   * @param {string} [options.storageKey]  the storage key; one per user
   * @param {number} [options.pageSize=50]  messages per history page
   * @param {typeof WebSocket} [options.WebSocket]  for tests or non-browser runtimes
   */
  constructor({
    url = "/ws",
    token,
    getToken = null,
    storage = null,
    storageKey = `chat.outbox.${jwtClaims(token ?? "").sub ?? "anonymous"}`,
    WebSocket: Socket = globalThis.WebSocket,
    ...rest
  }) {
    super();
    this.#path = url;
    this.#token = token;
    this.#getToken = getToken;
    this.#WebSocket = Socket;
    this.#storage = storage;
    this.#storageKey = storageKey;
    this.#options = { ...DEFAULT_OPTIONS, ...rest };
    this.#restoreOutbox();
  }

  /** One of "idle", "connecting", "open", "online", "waiting", "stopped". */
  get state() {
    return this.#state;
  }

  /** The user the server bound this connection to (from `authenticated`), or null. */
  get userId() {
    return this.#userId;
  }

  /** Sends, edits and deletes not acknowledged yet, oldest first. */
  get outbox() {
    return [...this.#outbox.values()];
  }

  /** Sends the server refused for good, kept until `retry()` or `discard()`. */
  get failed() {
    return [...this.#failed.values()];
  }

  /**
   * The chat with that id, or undefined. A chat state is a plain object; read it, do not change
   * it: {chatId, kind, title, participants, createdBy, createdAt, messages (Map seq -> message
   * object), low, high (the held range), newest (highest seq known), lastMessage, unread,
   * readUpTo, deliveredUpTo (user id -> seq), known (a chat object arrived), loaded (holds the
   * newest page since the last bind)}.
   */
  chat(chatId) {
    return this.#chats.get(chatId);
  }

  /** Every chat, most recently active first. */
  chatList() {
    return [...this.#chats.values()]
      .filter((chat) => chat.known)
      .sort((a, b) => (activityOf(a) < activityOf(b) ? 1 : activityOf(a) > activityOf(b) ? -1 : 0));
  }

  /** The messages held for a chat, by seq. */
  messages(chatId) {
    const chat = this.#chats.get(chatId);
    if (!chat) return [];
    return [...chat.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  /**
   * True when the chat has messages older than the ones held ("load older"). A member who
   * joined a group late sees its history from their joining on: the server's `has_more: false`
   * says where it starts for them.
   */
  hasOlder(chatId) {
    const chat = this.#chats.get(chatId);
    if (!chat || chat.complete) return false;
    return chat.messages.size > 0 ? chat.low > 1 : chat.newest > 0;
  }

  /** "sent", "delivered" or "read" for one of the user's own messages. */
  status(chatId, message) {
    const chat = this.#chats.get(chatId);
    return chat ? receiptStatus(chat, message, this.#userId) : "sent";
  }

  /** Connect and stay connected until `stop()`. */
  start() {
    if (this.#state === "idle" || this.#state === "stopped") this.#connect();
  }

  /** Close for good; pending sends stay in `outbox` (and storage) but are not retried. */
  stop() {
    this.#clearTimers();
    this.#clearTypists();
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
   * Create a group of this user and `memberIds` (not the user); every call creates a new one.
   * Returns the request id; the reply is a `new_chats` frame carrying it, or an `error`.
   */
  createGroup({ title, memberIds }) {
    return this.#request({ type: "create_group", title, member_ids: [...memberIds] });
  }

  /** Add users to a group (any member may); the reply is a `chat_updated` frame, or an `error`. */
  addMembers(chatId, memberIds) {
    return this.#request({ type: "add_members", chat_id: chatId, member_ids: [...memberIds] });
  }

  /**
   * Remove a member from a group (only its creator may remove others), or leave it when
   * `userId` is this user. The reply is a `chat_updated` frame, or an `error`.
   */
  removeMember(chatId, userId) {
    const requestId = this.#request({ type: "remove_member", chat_id: chatId, user_id: userId });
    if (userId === this.#userId) this.#leaving.set(requestId, chatId);
    return requestId;
  }

  /** Leave a group: remove this user from it. */
  leaveChat(chatId) {
    return this.removeMember(chatId, this.#userId);
  }

  /** The other members who have read one of the user's messages (see `readersOf`). */
  readers(chatId, message) {
    const chat = this.#chats.get(chatId);
    return chat ? readersOf(chat, message, this.#userId) : [];
  }

  /**
   * Say that this user is typing in a chat (`active` true) or stopped (false). Call it on every
   * input event, with false when the composer is cleared, after a send, and when the person
   * leaves the chat: the throttling is done here (see "Typing" above). Returns true when a
   * frame went out.
   */
  typing(chatId, active = true) {
    const now = Date.now();
    const last = this.#typingSent.get(chatId);
    if (active) {
      if (last !== undefined && now - last < this.#options.typingRenewMs) return false;
      if ((this.#typingMuted.get(chatId) ?? 0) > now) return false;
      const chat = this.#chats.get(chatId);
      // The server refuses it across a block; this user's own blocks are known here.
      if (chat?.kind === "direct" && chat.participants.some((user) => this.#blocked.has(user))) {
        return false;
      }
    } else {
      if (last === undefined) return false;
      this.#typingSent.delete(chatId);
      if (now - last >= this.#options.typingExpiresMs) return false; // expired there already
    }
    if (this.#state !== "online") return false;
    const requestId = this.#nextRequestId();
    if (!this.#write({ type: "typing", chat_id: chatId, active, request_id: requestId })) {
      return false;
    }
    if (active) this.#typingSent.set(chatId, now);
    this.#typingRequests.set(requestId, chatId);
    if (this.#typingRequests.size > TYPING_REQUESTS_KEPT) {
      this.#typingRequests.delete(this.#typingRequests.keys().next().value);
    }
    return true;
  }

  /** The other members typing in a chat now, in the order they started. */
  typists(chatId) {
    return [...(this.#typists.get(chatId)?.keys() ?? [])];
  }

  /**
   * What the server last said about a user's presence: `{online, lastSeen}` (`lastSeen` an
   * ISO timestamp, or null while online, if never connected, or when not visible: a stranger,
   * or a block either way), or null when it has not said.
   */
  presence(userId) {
    return this.#presence.get(userId) ?? null;
  }

  /**
   * Ask for presence: of `userIds` (any number; sent 200 a frame), or without them of the
   * user's 200 most recently active contacts. Returns the request ids. The client asks for
   * the direct chats' other sides by itself; this is for anyone else the UI shows.
   */
  fetchPresence(userIds = null) {
    if (userIds === null || userIds === undefined) {
      return [this.#request({ type: "fetch_presence" })];
    }
    const ids = [...new Set(userIds)];
    const requests = [];
    for (let start = 0; start < ids.length; start += this.#options.presenceBatch) {
      const batch = ids.slice(start, start + this.#options.presenceBatch);
      requests.push(this.#request({ type: "fetch_presence", user_ids: batch }));
    }
    return requests;
  }

  /** The user ids this user blocks, sorted (as the server last said). */
  get blocked() {
    return [...this.#blocked].sort();
  }

  /** True while this user blocks `userId`. */
  isBlocked(userId) {
    return this.#blocked.has(userId);
  }

  /** Block a user; the reply is a `blocked` frame with the whole list, or an `error`. */
  blockUser(userId) {
    return this.#request({ type: "block_user", user_id: userId });
  }

  /** Unblock a user; the reply is a `blocked` frame with the whole list, or an `error`. */
  unblockUser(userId) {
    return this.#request({ type: "unblock_user", user_id: userId });
  }

  /** Ask for the list of blocked users (done after every bind); the reply is `blocked`. */
  fetchBlocked() {
    return this.#request({ type: "fetch_blocked" });
  }

  /**
   * Send a message. Returns the outbox entry; its `state` goes "queued"/"sending" -> "sent"
   * (the server stored it and echoed it back) or "failed" (the server refused it for good).
   * In a group there is no recipient: `recipientId` is left out (and not sent if given).
   */
  sendMessage({ chatId, recipientId = null, content, clientMessageId = newId() }) {
    const group = this.#chats.get(chatId)?.kind === "group";
    const frame = { type: "send_message", chat_id: chatId };
    if (!group && recipientId !== null && recipientId !== undefined) {
      frame.recipient_id = recipientId;
    }
    frame.content = content;
    frame.client_message_id = clientMessageId;
    return this.#enqueue(this.#newEntry("send", clientMessageId, frame));
  }

  /** Replace the content of one of the user's messages; acknowledged by `message_updated`. */
  editMessage({ chatId, messageId, content }) {
    const frame = { type: "edit_message", chat_id: chatId, message_id: messageId, content };
    return this.#enqueue(this.#newEntry("edit", `change:${chatId}:${messageId}`, frame));
  }

  /** Delete one of the user's messages (it stays as a tombstone); acknowledged likewise. */
  deleteMessage({ chatId, messageId }) {
    const frame = { type: "delete_message", chat_id: chatId, message_id: messageId };
    return this.#enqueue(this.#newEntry("delete", `change:${chatId}:${messageId}`, frame));
  }

  /** The edit or delete of that message still waiting for the server, if any. */
  pendingChange(chatId, messageId) {
    return this.#outbox.get(`change:${chatId}:${messageId}`) ?? null;
  }

  /** Send a refused message again, with the same `client_message_id`. */
  retry(clientMessageId) {
    const entry = this.#failed.get(clientMessageId);
    if (!entry) return null;
    this.#failed.delete(clientMessageId);
    entry.error = null;
    entry.internalRetries = 0;
    entry.state = "queued";
    return this.#enqueue(entry);
  }

  /** Forget a refused message (the person removed it, or moved it back to the composer). */
  discard(clientMessageId) {
    const entry = this.#failed.get(clientMessageId);
    if (!entry) return;
    this.#failed.delete(clientMessageId);
    this.#persist(entry, { remove: true });
    this.#touch(entry.chatId);
    this.#flushChanges();
  }

  /**
   * The UI opened this chat: keep its history loaded. Fetches the newest page unless this
   * client already holds it since the last bind.
   */
  openChat(chatId) {
    const chat = this.#chatState(chatId);
    chat.wanted = true;
    if (!chat.loaded) this.#fetchNewest(chat);
  }

  /**
   * The chat that is on screen and visible, or null. Its newest message is marked read now, and
   * every message from someone else that arrives while it stays on screen.
   */
  setViewing(chatId) {
    this.#viewing = chatId ?? null;
    if (this.#viewing) {
      this.openChat(this.#viewing);
      this.markRead(this.#viewing);
      this.#flushChanges();
    }
  }

  /** Mark a chat read up to its newest message (nothing is sent when it already is). */
  markRead(chatId) {
    const chat = this.#chats.get(chatId);
    if (!chat || chat.newest <= (chat.readUpTo[this.#userId] ?? 0)) return;
    if (chat.newest > chat.readWanted) {
      chat.readWanted = chat.newest;
      this.#recount(chat);
      this.#touch(chat.chatId);
    }
    this.#sendMark(chat);
    this.#flushChanges();
  }

  /** The page of a chat's history older than what is held. */
  loadOlder(chatId, limit = this.#options.pageSize) {
    const chat = this.#chats.get(chatId);
    const oldest = chat?.messages.get(chat.low);
    if (!oldest || chat.low <= 1 || chat.olderRequest) return null;
    chat.olderRequest = this.fetchMessages(chatId, { before: oldest.message_id, limit });
    this.#pending.set(chat.olderRequest, { kind: "older", chatId });
    return chat.olderRequest;
  }

  /**
   * Every chat; with `limit` 0 (what this client sends by itself) only `all_chats` with counts
   * and marks, otherwise also one `all_messages` per chat with its latest messages.
   */
  fetchChats({ limit } = {}) {
    return this.#request({ type: "fetch_chats", ...(limit !== undefined ? { limit } : {}) });
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
    this.#forgetConnection();
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

  /** What was in flight on a closed connection is unknown: ask again after the next bind. */
  #forgetConnection() {
    this.#pending.clear();
    this.#leaving.clear();
    this.#chatsRequest = null;
    this.#chatsAgain = false;
    // Typing is live only: nobody's indicator can be renewed or stopped while away (and the
    // server stops this user's own when the connection goes).
    this.#clearTypists();
    this.#typingSent.clear();
    this.#typingRequests.clear();
    this.#typingMuted.clear();
    // Presence is asked again once the next bind's chat list is in; until then the last
    // known state stays on screen, so a quick reconnect does not flicker.
    this.#presenceAsked.clear();
    this.#presenceWanted.clear();
    this.#listLoaded = false;
    for (const chat of this.#chats.values()) {
      // Messages may arrive on another device meanwhile and never be this one's backlog.
      chat.loaded = false;
      chat.complete = false;
      chat.newestRequest = null;
      chat.olderRequest = null;
      chat.markRequest = null;
      chat.markSent = 0;
      chat.readWanted = 0;
    }
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
    // The blocks first (another device may have changed them meanwhile), so a blocked chat is
    // shown as such from the start; then the chat list with every count and mark (receipts are
    // not replayed on binding).
    this.fetchBlocked();
    this.#refreshChats();
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
      case "all_chats":
        this.#onAllChats(frame);
        break;
      case "new_chats":
        for (const object of frame.data ?? []) this.#applyChat(object);
        break;
      case "all_messages":
        this.#onAllMessages(frame);
        break;
      case "new_messages":
        this.#takeMessages(this.#chatState(frame.chat_id), frame.data ?? []);
        break;
      case "message":
        this.#onMessage(frame);
        break;
      case "message_updated":
        this.#applyUpdate(messageObject(frame), frame.request_id);
        break;
      case "updated_messages":
        for (const message of frame.data ?? []) this.#applyUpdate(message, undefined);
        break;
      case "receipt":
        this.#onReceipt(frame);
        break;
      case "chat_updated":
        this.#onChatUpdated(frame);
        break;
      case "typing":
        this.#onTyping(frame);
        break;
      case "presence":
        this.#onPresence(frame);
        break;
      case "blocked":
        this.#onBlocked(frame);
        break;
      case "error":
        if (this.#typingRefused(frame)) return; // best effort: not the UI's business
        this.#onError(frame);
        break;
      default:
        break;
    }
    this.#askPresence();
    this.#flushChanges();
    // Unknown types are ignored, as the protocol asks of clients.
    if (SERVER_FRAME_TYPES.includes(frame.type)) this.#emit(frame.type, frame);
  }

  #onAllChats(frame) {
    if (frame.request_id !== undefined && frame.request_id === this.#chatsRequest) {
      this.#chatsRequest = null;
      if (this.#chatsAgain) {
        this.#chatsAgain = false;
        this.#refreshChats();
      }
    }
    const present = new Set();
    for (const object of frame.data ?? []) {
      present.add(object.chat_id);
      this.#applyChat(object);
    }
    // `all_chats` is every chat of the user: one not in it is no longer theirs.
    for (const [chatId, chat] of this.#chats) {
      if (chat.known && !present.has(chatId)) this.#dropChat(chat, false);
    }
    this.#listLoaded = true; // presence can be asked for its direct chats now
    const viewing = this.#viewing && this.#chats.get(this.#viewing);
    if (viewing) {
      if (!viewing.loaded) this.#fetchNewest(viewing);
      this.markRead(viewing.chatId);
    }
  }

  /**
   * A group's membership changed. The chat object is computed for this user; when it no longer
   * lists the user, they left or were removed: the chat goes (the server refuses it from now on).
   */
  #onChatUpdated(frame) {
    const object = frame.data;
    if (!object || typeof object.chat_id !== "string") return;
    const left = this.#leaving.get(frame.request_id);
    this.#leaving.delete(frame.request_id);
    const participants = Array.isArray(object.participants) ? object.participants : null;
    if (participants && this.#userId && !participants.includes(this.#userId)) {
      const chat = this.#chats.get(object.chat_id);
      if (chat) {
        if (object.title !== undefined) chat.title = object.title;
        this.#dropChat(chat, left === object.chat_id);
      }
      return;
    }
    this.#applyChat(object);
  }

  /** The user is not in this chat any more: forget it, and what waits to be sent to it. */
  #dropChat(chat, left) {
    this.#chats.delete(chat.chatId);
    for (const user of this.typists(chat.chatId)) this.#stopTyping(chat.chatId, user);
    if (this.#viewing === chat.chatId) this.#viewing = null;
    for (const [id, entry] of [...this.#outbox, ...this.#failed]) {
      if (entry.chatId !== chat.chatId) continue;
      this.#outbox.delete(id);
      this.#failed.delete(id);
      this.#persist(entry, { remove: true });
    }
    this.#touch(chat.chatId);
    if (chat.known) {
      this.#emit("chat-removed", { chatId: chat.chatId, title: chat.title, kind: chat.kind, left });
    }
  }

  /** A chat object: the server's state of the chat for this user. */
  #applyChat(object) {
    const me = this.#userId;
    const chat = this.#chatState(object.chat_id);
    chat.known = true;
    chat.kind = object.kind ?? "direct";
    chat.title = object.title ?? null;
    chat.participants = [...(object.participants ?? chat.participants)];
    chat.createdBy = object.created_by ?? chat.createdBy;
    chat.createdAt = object.created_at ?? chat.createdAt;
    // Marks only move forward: a chat object computed before a receipt we already took in
    // cannot move one back.
    for (const [user, seq] of Object.entries(object.read_up_to ?? {}))
      raise(chat.readUpTo, user, seq);
    for (const [user, seq] of Object.entries(object.delivered_up_to ?? {})) {
      raise(chat.deliveredUpTo, user, seq);
    }
    if (object.joined_seq) chat.joinedSeq = { ...object.joined_seq };
    if (chat.kind === "direct") {
      for (const user of chat.participants) {
        if (user !== me && !this.#presenceAsked.has(user)) this.#presenceWanted.add(user);
      }
    }
    const last = object.last_message ?? null;
    const lastSeq = last?.seq ?? 0;
    if (last) {
      this.#hold(chat, last);
      if (!chat.lastMessage || lastSeq >= chat.lastMessage.seq) chat.lastMessage = last;
    }
    if (lastSeq > chat.newest) chat.newest = lastSeq;
    // The server's count, plus what we hold that is newer than what it counted.
    const counted = Math.max(lastSeq, object.read_up_to?.[me] ?? 0, this.#readMark(chat));
    let unread = Number.isInteger(object.unread_count) ? object.unread_count : 0;
    for (const message of chat.messages.values()) {
      if (message.seq > counted && this.#countable(message)) unread += 1;
    }
    chat.unread = unread;
    const stale = (object.read_up_to?.[me] ?? 0) < (chat.readUpTo[me] ?? 0);
    if (!this.#recount(chat) && stale) this.#refreshChats();
    if (chat.wanted && !chat.loaded && lastSeq > chat.high && this.#state === "online") {
      if (chat.chatId === this.#viewing) this.#fetchNewest(chat);
    }
    this.#touch(chat.chatId);
  }

  #onAllMessages(frame) {
    const request = this.#pending.get(frame.request_id);
    if (request) this.#pending.delete(frame.request_id);
    const chat = this.#chatState(frame.chat_id);
    this.#takeMessages(chat, frame.data ?? []);
    // The server has nothing older for this user: what is held starts at their first message.
    if (request && frame.has_more === false) chat.complete = true;
    if (request?.kind === "newest") {
      chat.newestRequest = null;
      chat.loaded = true;
      this.#refreshHeld(chat, frame.data ?? []);
    } else if (request?.kind === "older") {
      chat.olderRequest = null;
    } else if (!frame.has_more && (frame.data ?? []).length === 0) {
      chat.loaded = true; // fetch_chats with a limit: an empty chat
    }
    this.#touch(chat.chatId);
  }

  #onMessage(frame) {
    const message = messageObject(frame);
    const chat = this.#chatState(message.chat_id);
    if (chat.participants.length === 0) {
      chat.participants = [message.sender_id, message.recipient_id].filter(Boolean).sort();
    }
    if (!chat.known) this.#refreshChats(); // its chat object brings its marks and count
    this.#takeMessages(chat, [message]);
  }

  /** One of the user's messages came back from the server: its send is acknowledged. */
  #acknowledge(message) {
    const entry = message.client_message_id && this.#outbox.get(message.client_message_id);
    if (!entry || entry.kind !== "send" || message.sender_id !== this.#userId) return;
    this.#outbox.delete(entry.id);
    this.#persist(entry, { remove: true });
    entry.message = message;
    this.#changeEntry(entry, "sent");
  }

  /** New messages (live, backlog or a fetched page) into the model. */
  #takeMessages(chat, messages) {
    const me = this.#userId;
    const sorted = [...messages]
      .filter((m) => Number.isInteger(m?.seq))
      .sort((a, b) => a.seq - b.seq);
    let othersArrived = false;
    for (const message of sorted) {
      const previous = chat.messages.get(message.seq);
      const isNew = message.seq > chat.newest;
      if (isNew) {
        chat.newest = message.seq;
        // Sending moves the sender's own marks up to the message.
        raise(chat.readUpTo, message.sender_id, message.seq);
        raise(chat.deliveredUpTo, message.sender_id, message.seq);
        if (message.sender_id !== me) {
          othersArrived = true;
          this.#stopTyping(chat.chatId, message.sender_id); // what they typed has arrived
          const onScreen = this.#viewing === chat.chatId;
          if (!onScreen && this.#countable(message)) chat.unread += 1;
        }
      } else if (previous && !previous.deleted && message.deleted) {
        this.#uncount(chat, previous);
      }
      if (!chat.lastMessage || message.seq >= chat.lastMessage.seq) chat.lastMessage = message;
    }
    // Above what is held ascending, below it descending, so a batch extends the range in order.
    for (const message of sorted)
      if (chat.messages.size === 0 || message.seq >= chat.low) this.#hold(chat, message);
    for (const message of sorted.reverse()) if (message.seq < chat.low) this.#hold(chat, message);
    this.#recount(chat);
    // Any copy of the user's own message proves it stored: the live one, or one in a page or
    // the backlog when the acknowledgement itself was lost.
    for (const message of messages) this.#acknowledge(message);
    if (othersArrived && this.#viewing === chat.chatId) this.markRead(chat.chatId);
    if (chat.wanted && !chat.loaded && chat.low > 1 && chat.chatId === this.#viewing) {
      this.#fetchNewest(chat); // a gap closed what we held: load the page below the newest
    }
    this.#touch(chat.chatId);
  }

  /** An edited or deleted message, in its new state. */
  #applyUpdate(message, requestId) {
    if (!Number.isInteger(message?.seq)) return;
    const chat = this.#chatState(message.chat_id);
    const previous = chat.messages.get(message.seq);
    if (previous) {
      chat.messages.set(message.seq, message);
      if (!previous.deleted && message.deleted) this.#uncount(chat, previous);
    } else if (message.seq > chat.newest) {
      // A change to a message we never had: our view of the chat is behind.
      this.#takeMessages(chat, [message]);
      this.#refreshChats();
    } else if (message.deleted && message.sender_id !== this.#userId) {
      // Was it counted as unread? Only the server can tell.
      if (message.seq > this.#readMark(chat)) this.#refreshChats();
    }
    if (chat.lastMessage?.seq === message.seq) chat.lastMessage = message;
    this.#recount(chat);
    this.#touch(chat.chatId);
    const entry = this.#outbox.get(`change:${message.chat_id}:${message.message_id}`);
    if (entry) {
      const done =
        (requestId !== undefined && requestId === entry.requestId) ||
        (entry.kind === "delete" && message.deleted) ||
        (entry.kind === "edit" && !message.deleted && message.content === entry.frame.content);
      if (done) {
        this.#outbox.delete(entry.id);
        this.#persist(entry, { remove: true });
        entry.message = message;
        this.#changeEntry(entry, "sent");
      }
    }
  }

  #onReceipt(frame) {
    const chat = this.#chats.get(frame.chat_id);
    if (!chat || !Number.isInteger(frame.seq)) return;
    if (frame.kind === "read") {
      raise(chat.readUpTo, frame.user_id, frame.seq);
      raise(chat.deliveredUpTo, frame.user_id, frame.seq); // reading implies delivery
    } else if (frame.kind === "delivered") {
      raise(chat.deliveredUpTo, frame.user_id, frame.seq);
    }
    if (frame.request_id !== undefined && frame.request_id === chat.markRequest) {
      this.#pending.delete(frame.request_id);
      chat.markRequest = null;
      this.#sendMark(chat); // newer messages were read while this one was in flight
    }
    if (frame.user_id === this.#userId && frame.kind === "read") {
      // The user read this far, here or on another device. Holding every message after the
      // mark, we count the rest ourselves; otherwise the server knows.
      if (!this.#recount(chat)) this.#refreshChats();
    }
    this.#touch(chat.chatId);
  }

  // ------------------------------------------------------------------ typing, presence, blocks

  #onTyping(frame) {
    const { chat_id: chatId, user_id: userId } = frame;
    if (typeof chatId !== "string" || typeof userId !== "string") return;
    if (userId === this.#userId) return; // the server never sends it; a typist is someone else
    if (frame.active === false) {
      this.#stopTyping(chatId, userId);
      return;
    }
    const lifetime =
      Number.isFinite(frame.expires_in_ms) && frame.expires_in_ms > 0
        ? frame.expires_in_ms
        : this.#options.typingExpiresMs;
    let typists = this.#typists.get(chatId);
    if (!typists) {
      typists = new Map();
      this.#typists.set(chatId, typists);
    }
    clearTimeout(typists.get(userId));
    const timer = setTimeout(() => {
      if (this.#typists.get(chatId)?.get(userId) !== timer) return;
      this.#stopTyping(chatId, userId);
      this.#flushChanges();
    }, lifetime);
    typists.set(userId, timer); // a renewal keeps the typist's place in the order
    this.#touch(chatId);
  }

  #stopTyping(chatId, userId) {
    const typists = this.#typists.get(chatId);
    if (!typists?.has(userId)) return;
    clearTimeout(typists.get(userId));
    typists.delete(userId);
    if (typists.size === 0) this.#typists.delete(chatId);
    this.#touch(chatId);
  }

  #clearTypists() {
    for (const [chatId, typists] of this.#typists) {
      for (const timer of typists.values()) clearTimeout(timer);
      this.#touch(chatId);
    }
    this.#typists.clear();
  }

  /** An error answering one of this client's typing frames: pause typing in that chat. */
  #typingRefused(frame) {
    const chatId = this.#typingRequests.get(frame.request_id);
    if (chatId === undefined) return false;
    this.#typingRequests.delete(frame.request_id);
    this.#typingSent.delete(chatId);
    if (frame.code === "rate_limited") return true; // the next keystroke tries again
    this.#typingMuted.set(chatId, Date.now() + this.#options.typingMuteMs);
    return true;
  }

  #onPresence(frame) {
    if (!Array.isArray(frame.data)) return;
    const changed = new Set();
    for (const entry of frame.data) {
      if (typeof entry?.user_id !== "string") continue;
      const lastSeen = typeof entry.last_seen === "string" ? entry.last_seen : null;
      this.#presence.set(entry.user_id, { online: entry.online === true, lastSeen });
      changed.add(entry.user_id);
    }
    this.#touchDirectChatsOf(changed);
  }

  #onBlocked(frame) {
    if (!Array.isArray(frame.data)) return;
    const next = new Set(frame.data.filter((user) => typeof user === "string"));
    const changed = new Set();
    for (const user of next) if (!this.#blocked.has(user)) changed.add(user);
    for (const user of this.#blocked) if (!next.has(user)) changed.add(user);
    this.#blocked = next;
    for (const user of changed) {
      if (!next.has(user)) continue;
      // Nothing more comes from them across the block, not even the end of their typing.
      for (const chatId of [...this.#typists.keys()]) this.#stopTyping(chatId, user);
    }
    this.#touchDirectChatsOf(changed);
  }

  #touchDirectChatsOf(users) {
    if (users.size === 0) return;
    for (const chat of this.#chats.values()) {
      if (chat.kind === "direct" && chat.participants.some((user) => users.has(user))) {
        this.#touch(chat.chatId);
      }
    }
  }

  /** Ask about the direct chats' other sides not asked since the bind, 200 ids a frame. */
  #askPresence() {
    if (!this.#listLoaded || this.#state !== "online" || this.#presenceWanted.size === 0) return;
    const users = [...this.#presenceWanted].filter((user) => !this.#presenceAsked.has(user));
    this.#presenceWanted.clear();
    for (const user of users) this.#presenceAsked.add(user);
    if (users.length > 0) this.fetchPresence(users);
  }

  async #onError(frame) {
    const pending = this.#pending.get(frame.request_id);
    if (pending) this.#requestFailed(pending, frame);
    if (frame.request_id !== undefined && frame.request_id === this.#chatsRequest) {
      this.#chatsRequest = null;
      const again = frame.code === "rate_limited" || frame.code === "internal";
      if (again || this.#chatsAgain) {
        this.#chatsAgain = false;
        setTimeout(() => this.#refreshChats(), frame.retry_after_ms ?? 1000);
      }
    }
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
      this.#outbox.delete(entry.id);
      entry.error = frame;
      entry.state = "failed";
      if (entry.kind === "send") {
        this.#failed.set(entry.id, entry);
        this.#persist(entry);
      } else {
        this.#persist(entry, { remove: true });
      }
      this.#touch(entry.chatId);
      this.#changeEntry(entry, "failed");
    }
  }

  #requestFailed(pending, frame) {
    this.#pending.delete(frame.request_id);
    const chat = this.#chats.get(pending.chatId);
    if (!chat) return;
    if (pending.kind === "newest") chat.newestRequest = null;
    if (pending.kind === "older") chat.olderRequest = null;
    if (pending.kind === "mark") {
      chat.markRequest = null;
      chat.markSent = 0;
      chat.readWanted = 0; // not marked: the server's mark and count stand
      this.#refreshChats();
    }
    if (frame.code === "forbidden" || frame.code === "not_found") {
      chat.wanted = false;
      if (this.#viewing === chat.chatId) this.#viewing = null;
    }
    this.#touch(chat.chatId);
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

  // ------------------------------------------------------------------ the chat model

  #chatState(chatId) {
    let chat = this.#chats.get(chatId);
    if (!chat) {
      chat = {
        chatId,
        kind: "direct",
        title: null,
        participants: [],
        createdBy: null,
        createdAt: null,
        messages: new Map(),
        low: 0,
        high: 0,
        newest: 0,
        lastMessage: null,
        unread: 0,
        readUpTo: {},
        deliveredUpTo: {},
        joinedSeq: {}, // a group's: the seq each member joined after
        known: false,
        loaded: false,
        complete: false, // held messages start at the first one this user may see
        wanted: false,
        newestRequest: null,
        olderRequest: null,
        markRequest: null,
        markSent: 0,
        readWanted: 0,
      };
      this.#chats.set(chatId, chat);
    }
    return chat;
  }

  /**
   * Keep a message in the held range, which stays one gapless run of seqs. A message right
   * above or below extends it; one further above means messages are missing in between (they
   * went to another device while this one was away): what was held is dropped and the run
   * starts again from the newest. One further below waits for "load older".
   */
  #hold(chat, message) {
    const seq = message.seq;
    if (!Number.isInteger(seq) || seq < 1) return;
    if (chat.messages.size === 0) {
      chat.low = seq;
      chat.high = seq;
    } else if (seq > chat.high + 1) {
      chat.messages.clear();
      chat.low = seq;
      chat.high = seq;
      chat.loaded = false;
      chat.complete = false;
    } else if (seq < chat.low - 1) {
      return;
    } else {
      chat.low = Math.min(chat.low, seq);
      chat.high = Math.max(chat.high, seq);
    }
    chat.messages.set(seq, message);
  }

  /** The user's read mark, or the newer one this client is about to send. */
  #readMark(chat) {
    return Math.max(chat.readUpTo[this.#userId] ?? 0, chat.readWanted);
  }

  #countable(message) {
    return message.sender_id !== this.#userId && !message.deleted;
  }

  /** A message counted as unread was deleted. */
  #uncount(chat, previous) {
    if (previous.sender_id !== this.#userId && previous.seq > this.#readMark(chat)) {
      chat.unread = Math.max(0, chat.unread - 1);
    }
  }

  /**
   * Count the unread messages when every message after the read mark is held; returns false
   * (and leaves the count as it is) when some are not.
   */
  #recount(chat) {
    const mark = this.#readMark(chat);
    if (chat.newest <= mark) {
      chat.unread = 0;
      return true;
    }
    if (chat.messages.size === 0 || chat.low > mark + 1 || chat.high < chat.newest) return false;
    let unread = 0;
    for (let seq = Math.max(mark + 1, chat.low); seq <= chat.newest; seq += 1) {
      const message = chat.messages.get(seq);
      if (!message) return false;
      if (this.#countable(message)) unread += 1;
    }
    chat.unread = unread;
    return true;
  }

  /**
   * Messages held from before a reconnect, below the newest page just fetched, may have been
   * edited or deleted meanwhile, and the change may have gone to another device of the user
   * (changes, like messages, are delivered once per user): fetch them again, at most 1000.
   */
  #refreshHeld(chat, page) {
    const seqs = page.map((message) => message?.seq).filter(Number.isInteger);
    if (seqs.length === 0) return;
    const pageLow = Math.min(...seqs);
    const first = chat.messages.get(pageLow);
    if (!first || chat.low >= pageLow) return;
    const limit = 1000;
    for (let seq = chat.low; seq < pageLow - limit; seq += 1) chat.messages.delete(seq);
    chat.low = Math.max(chat.low, pageLow - limit);
    const requestId = this.fetchMessages(chat.chatId, {
      before: first.message_id,
      limit: pageLow - chat.low,
    });
    this.#pending.set(requestId, { kind: "refresh", chatId: chat.chatId });
  }

  #fetchNewest(chat) {
    if (chat.newestRequest || !chat.known || this.#state !== "online") return;
    chat.newestRequest = this.fetchMessages(chat.chatId, { limit: this.#options.pageSize });
    this.#pending.set(chat.newestRequest, { kind: "newest", chatId: chat.chatId });
  }

  /** Send `mark_read` for what the person has seen; one in flight per chat. */
  #sendMark(chat) {
    if (chat.markRequest || this.#state !== "online") return;
    const seq = chat.readWanted;
    if (seq <= (chat.readUpTo[this.#userId] ?? 0) || seq <= chat.markSent) return;
    const message =
      chat.messages.get(seq) ?? (chat.lastMessage?.seq === seq ? chat.lastMessage : null);
    if (!message) return;
    chat.markSent = seq;
    chat.markRequest = this.#request({
      type: "mark_read",
      chat_id: chat.chatId,
      message_id: message.message_id,
    });
    this.#pending.set(chat.markRequest, { kind: "mark", chatId: chat.chatId });
  }

  /** Ask for the chat list with counts and marks; one request at a time. */
  #refreshChats() {
    if (this.#state !== "online") return; // binding asks anyway
    if (this.#chatsRequest) {
      this.#chatsAgain = true;
      return;
    }
    this.#chatsRequest = this.fetchChats({ limit: 0 });
  }

  #touch(chatId) {
    if (chatId) this.#changed.add(chatId);
  }

  #flushChanges() {
    if (this.#changed.size === 0) return;
    const chatIds = [...this.#changed];
    this.#changed.clear();
    this.#emit("change", { chatIds });
  }

  // ------------------------------------------------------------------ outbox

  #newEntry(kind, id, frame) {
    return {
      id,
      kind,
      clientMessageId: kind === "send" ? id : null,
      chatId: frame.chat_id,
      messageId: frame.message_id ?? null,
      requestId: null,
      frame,
      state: "queued",
      createdAt: new Date(),
      message: null,
      error: null,
      internalRetries: 0,
    };
  }

  #enqueue(entry) {
    entry.requestId = this.#nextRequestId();
    entry.frame.request_id = entry.requestId;
    const replaced = this.#outbox.get(entry.id);
    if (replaced) this.#outbox.delete(entry.id); // a newer edit or a delete wins
    this.#outbox.set(entry.id, entry);
    this.#persist(entry);
    if (this.#state === "online") this.#transmit(entry);
    if (entry.state === "queued") this.#emit("outbox", { entry });
    this.#touch(entry.chatId);
    this.#flushChanges();
    return entry;
  }

  /**
   * Mirror an entry into storage: a read-modify-write of one key, so tabs of the same user
   * sharing the storage keep each other's entries.
   */
  #persist(entry, { remove = false } = {}) {
    if (!this.#storage) return;
    try {
      const saved = JSON.parse(this.#storage.getItem(this.#storageKey) ?? "{}");
      const entries = saved && typeof saved.entries === "object" ? saved.entries : {};
      if (remove) {
        delete entries[entry.id];
      } else {
        const { request_id: _requestId, ...frame } = entry.frame;
        entries[entry.id] = {
          kind: entry.kind,
          frame,
          createdAt: entry.createdAt.toISOString(),
          failed: entry.state === "failed",
          error: entry.error ? { code: entry.error.code, message: entry.error.message } : null,
        };
      }
      this.#storage.setItem(this.#storageKey, JSON.stringify({ version: 1, entries }));
    } catch {
      // Storage full or unavailable (private mode): the outbox still works in memory.
    }
  }

  #restoreOutbox() {
    if (!this.#storage) return;
    let entries = {};
    try {
      entries = JSON.parse(this.#storage.getItem(this.#storageKey) ?? "{}").entries ?? {};
    } catch {
      return;
    }
    const saved = Object.entries(entries).sort(([, a], [, b]) =>
      a.createdAt < b.createdAt ? -1 : 1,
    );
    for (const [id, { kind, frame, createdAt, failed, error }] of saved) {
      if (!frame || typeof frame.chat_id !== "string") continue;
      const entry = this.#newEntry(kind, id, { ...frame });
      entry.createdAt = new Date(createdAt);
      entry.requestId = this.#nextRequestId();
      entry.frame.request_id = entry.requestId;
      if (failed) {
        entry.state = "failed";
        entry.error = error;
        this.#failed.set(id, entry);
      } else {
        this.#outbox.set(id, entry);
      }
    }
  }

  // ------------------------------------------------------------------ writing

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
