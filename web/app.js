/**
 * app.js: the browser chat UI.
 *
 * Every protocol concern (socket, reconnect, keep-alive, tokens, safe resends) lives in
 * chat-client.js; this file only keeps a small UI model (chats, messages, unread counts) fed by
 * the client's events, and renders it. Rendering is a plain rebuild of the visible lists,
 * batched per animation frame: simple to read, and fast enough for a chat window.
 */
import { ChatClient, fetchDevToken, jwtClaims } from "./chat-client.js";

const SESSION_KEY = "chat.session"; // sessionStorage: survives a reload, not a closed tab
const HISTORY_PAGE = 50; // messages per chat on sign-in and per "load older" click
const MAX_LOGGED_FRAMES = 500;
const ERROR_TOAST_MS = 20_000;

const $ = (id) => document.getElementById(id);

/** The UI model. Messages are keyed by `message_id`, or `local:<client_message_id>` until acked. */
const model = {
  session: null, // {token, userId, dev}
  client: null,
  chats: new Map(), // chat_id -> {chat, messages: Map<key, record>, hasMore}
  openChatId: null,
  pendingOpen: null, // request_id of the create_chat whose reply should open that chat
  lastRead: {}, // chat_id -> timestamp of the newest message the person has seen
  arrival: 0, // tie-breaker for messages with equal timestamps
  retryAt: null,
};

// ---------------------------------------------------------------------------- sign in / out

async function signInWithDevToken(userId) {
  const token = await fetchDevToken(userId);
  startSession({ token, userId, dev: true });
}

function signInWithJwt(token) {
  const { sub, exp } = jwtClaims(token);
  if (typeof sub !== "string") throw new Error("That does not look like a JWT with a sub claim.");
  if (typeof exp === "number" && exp * 1000 < Date.now())
    throw new Error("That token has expired.");
  startSession({ token, userId: sub, dev: false });
}

function startSession(session) {
  model.session = session;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  model.lastRead = JSON.parse(localStorage.getItem(lastReadKey()) ?? "{}");
  const client = new ChatClient({
    url: "/ws",
    token: session.token,
    // Dev tokens can be re-issued by the server; a pasted JWT cannot be refreshed by us.
    getToken: session.dev ? () => fetchDevToken(session.userId) : null,
  });
  model.client = client;
  wireClient(client);
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("whoami").hidden = false;
  $("sign-out").hidden = false;
  $("whoami").textContent = session.userId;
  $("sign-in-error").textContent = "";
  client.start();
  render();
}

function signOut(reason = "") {
  model.client?.stop();
  model.client = null;
  model.session = null;
  model.chats.clear();
  model.openChatId = null;
  bubbleCache.clear(); // "You" in a cached bubble meant the previous user
  sessionStorage.removeItem(SESSION_KEY);
  $("chat").hidden = true;
  $("sign-in").hidden = false;
  $("whoami").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-error").textContent = reason;
  document.body.classList.remove("conversation-open");
  setConnectionPill("stopped");
  render();
}

function lastReadKey() {
  return `chat.lastRead.${model.session.userId}`;
}

// ---------------------------------------------------------------------------- client events

function wireClient(client) {
  const on = (type, handler) =>
    client.addEventListener(type, (event) => {
      if (model.client === client) handler(event.detail);
    });

  on("frame", logFrame);
  on("state", ({ state, delayMs }) => {
    model.retryAt = state === "waiting" ? Date.now() + delayMs : null;
    setConnectionPill(state);
  });
  on("authenticated", () => {
    // The backlog (new_chats/new_messages) follows on its own; fetch_chats also brings what
    // another tab of this user already received, so every tab shows the same history.
    client.fetchChats({ limit: HISTORY_PAGE });
  });
  on("all_chats", (frame) => frame.data.forEach(upsertChat));
  on("new_chats", (frame) => {
    frame.data.forEach(upsertChat);
    if (frame.request_id !== undefined && frame.request_id === model.pendingOpen) {
      model.pendingOpen = null;
      $("new-chat-user").value = "";
      openChat(frame.data[0].chat_id);
    }
  });
  on("all_messages", (frame) => {
    const chat = chatEntry(frame.chat_id);
    const oldest = oldestMessage(chat);
    frame.data.forEach((message) => upsertMessage(message, "received"));
    // has_more describes the page's older side: only trust it when the page reaches back
    // at least as far as what we already hold.
    if (!oldest || frame.data.length === 0 || frame.data[0].timestamp <= oldest.timestamp) {
      chat.hasMore = Boolean(frame.has_more);
    }
  });
  on("new_messages", (frame) =>
    frame.data.forEach((message) => upsertMessage(message, "received")),
  );
  on("message", (frame) => upsertMessage(frame, "received"));
  on("outbox", ({ entry }) => updatePending(entry));
  on("error", (frame) => {
    if (frame.request_id !== undefined && frame.request_id === model.pendingOpen)
      model.pendingOpen = null;
    showError(frame);
  });
  on("auth-failed", ({ message }) => signOut(message));
}

// ---------------------------------------------------------------------------- model updates

function chatEntry(chatId, participants = null) {
  let entry = model.chats.get(chatId);
  if (!entry) {
    entry = {
      chat: { chat_id: chatId, participants: participants ?? [], created_by: "", created_at: "" },
      messages: new Map(),
      hasMore: false,
    };
    model.chats.set(chatId, entry);
  }
  return entry;
}

function upsertChat(chat) {
  chatEntry(chat.chat_id).chat = chat;
  render();
}

function upsertMessage(message, state) {
  const entry = chatEntry(message.chat_id, [message.sender_id, message.recipient_id].sort());
  if (message.client_message_id) entry.messages.delete(`local:${message.client_message_id}`);
  const own = message.sender_id === model.session.userId;
  const previous = entry.messages.get(message.message_id);
  entry.messages.set(message.message_id, {
    key: message.message_id,
    messageId: message.message_id,
    clientMessageId: message.client_message_id ?? null,
    senderId: message.sender_id,
    content: message.content,
    timestamp: message.timestamp,
    // Anything of ours that came back from the server is stored, i.e. sent.
    state: own ? "sent" : state,
    error: null,
    arrival: previous?.arrival ?? ++model.arrival,
  });
  if (entry.chat.chat_id === model.openChatId) markRead();
  render();
}

/** Mirror an outbox entry of the client as a local message until the server's copy replaces it. */
function updatePending(outboxEntry) {
  const { frame, state, error, message } = outboxEntry;
  if (state === "sent" && message) {
    upsertMessage(message, "sent");
    return;
  }
  const entry = chatEntry(frame.chat_id);
  entry.messages.set(`local:${outboxEntry.clientMessageId}`, {
    key: `local:${outboxEntry.clientMessageId}`,
    messageId: null,
    clientMessageId: outboxEntry.clientMessageId,
    senderId: model.session.userId,
    content: frame.content,
    timestamp: null,
    createdAt: outboxEntry.createdAt,
    state,
    error,
    arrival: entry.messages.get(`local:${outboxEntry.clientMessageId}`)?.arrival ?? ++model.arrival,
  });
  render();
}

function sortedMessages(entry) {
  // Stored messages in server order (timestamps never go backwards within a chat), then ours
  // that are still on their way, in the order they were typed.
  return [...entry.messages.values()].sort((a, b) => {
    if (!a.timestamp !== !b.timestamp) return a.timestamp ? -1 : 1;
    if (a.timestamp && a.timestamp !== b.timestamp) return a.timestamp < b.timestamp ? -1 : 1;
    return a.arrival - b.arrival;
  });
}

function oldestMessage(entry) {
  return sortedMessages(entry).find((record) => record.timestamp) ?? null;
}

function lastActivity(entry) {
  let latest = entry.chat.created_at || "";
  for (const record of entry.messages.values()) {
    const at = record.timestamp ?? record.createdAt?.toISOString() ?? "";
    if (at > latest) latest = at;
  }
  return latest;
}

function unreadCount(entry) {
  const seen = model.lastRead[entry.chat.chat_id] ?? "";
  let count = 0;
  for (const record of entry.messages.values()) {
    if (record.senderId !== model.session.userId && record.timestamp > seen) count += 1;
  }
  return count;
}

function markRead() {
  const entry = model.chats.get(model.openChatId);
  if (!entry || document.visibilityState !== "visible") return;
  let newest = model.lastRead[entry.chat.chat_id] ?? "";
  for (const record of entry.messages.values()) {
    if (record.timestamp && record.timestamp > newest) newest = record.timestamp;
  }
  model.lastRead[entry.chat.chat_id] = newest;
  localStorage.setItem(lastReadKey(), JSON.stringify(model.lastRead));
}

function otherParticipant(chat) {
  const me = model.session.userId;
  return chat.participants.find((user) => user !== me) ?? me;
}

// ---------------------------------------------------------------------------- actions

function openChat(chatId) {
  model.openChatId = chatId;
  document.body.classList.add("conversation-open");
  markRead();
  render({ scrollToEnd: true });
  $("message-input").focus();
}

function sendTypedMessage() {
  const input = $("message-input");
  const entry = model.chats.get(model.openChatId);
  const content = input.value;
  if (!entry || !content.trim()) return;
  model.client.sendMessage({
    chatId: entry.chat.chat_id,
    recipientId: otherParticipant(entry.chat),
    content,
  });
  input.value = "";
  autoResize(input);
  render({ scrollToEnd: true });
}

// ---------------------------------------------------------------------------- rendering

let renderQueued = false;
let scrollQueued = false;

function render({ scrollToEnd = false } = {}) {
  scrollQueued ||= scrollToEnd;
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (!model.session) return;
    const list = $("messages");
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    renderChatList();
    renderConversation();
    if (scrollQueued || nearBottom) list.scrollTop = list.scrollHeight;
    scrollQueued = false;
  });
}

function renderChatList() {
  const entries = [...model.chats.values()].sort((a, b) =>
    lastActivity(a) < lastActivity(b) ? 1 : -1,
  );
  const items = entries.map((entry) => {
    const chatId = entry.chat.chat_id;
    const last = sortedMessages(entry).at(-1);
    const unread = unreadCount(entry);
    const button = el("button", { type: "button", class: "chat-item", "data-chat-id": chatId });
    if (chatId === model.openChatId) button.setAttribute("aria-current", "true");
    button.append(
      el("span", { class: "chat-name" }, otherParticipant(entry.chat)),
      el("span", { class: "chat-time" }, last?.timestamp ? formatTime(last.timestamp) : ""),
      el("span", { class: "chat-preview" }, last ? last.content : "No messages yet"),
    );
    if (unread > 0) {
      button.append(
        el("span", { class: "badge", "aria-label": `${unread} unread` }, String(unread)),
      );
    }
    button.addEventListener("click", () => openChat(chatId));
    return el("li", {}, button);
  });
  $("chat-list").replaceChildren(...items);
  $("no-chats").hidden = entries.length > 0;
  const totalUnread = entries.reduce((sum, entry) => sum + unreadCount(entry), 0);
  document.title = totalUnread > 0 ? `(${totalUnread}) Chat` : "Chat";
}

function renderConversation() {
  const entry = model.chats.get(model.openChatId);
  $("message-input").disabled = !entry;
  $("send-button").disabled = !entry;
  $("back").hidden = !entry;
  if (!entry) {
    $("conversation-title").textContent = "Select a chat";
    $("conversation-id").textContent = "";
    syncChildren($("message-list"), []);
    $("no-messages").hidden = true;
    $("load-older").hidden = true;
    return;
  }
  $("conversation-title").textContent = otherParticipant(entry.chat);
  $("conversation-id").textContent = `chat ${entry.chat.chat_id}`;
  $("load-older").hidden = !entry.hasMore;
  const records = sortedMessages(entry);
  $("no-messages").hidden = records.length > 0;
  syncChildren($("message-list"), records.map(messageNode));
}

/** Rendered bubbles by message key, rebuilt only when what they show changes. */
const bubbleCache = new Map();

function messageNode(record) {
  const signature = JSON.stringify([
    record.state,
    record.messageId,
    record.timestamp,
    record.content,
    record.error?.code,
  ]);
  const cached = bubbleCache.get(record.key);
  if (cached?.signature === signature) return cached.node;
  const node = renderMessage(record);
  bubbleCache.set(record.key, { signature, node });
  return node;
}

/**
 * Make `parent`'s children exactly `nodes` while touching as few as possible: the message list
 * is an aria-live log, and a screen reader should announce new messages, not the whole chat.
 */
function syncChildren(parent, nodes) {
  nodes.forEach((node, index) => {
    if (parent.children[index] !== node) parent.insertBefore(node, parent.children[index] ?? null);
  });
  while (parent.children.length > nodes.length) parent.lastElementChild.remove();
  if (bubbleCache.size > nodes.length * 2 + 200) {
    const keep = new Set(nodes);
    for (const [key, { node }] of bubbleCache) if (!keep.has(node)) bubbleCache.delete(key);
  }
}

const STATE_LABELS = {
  queued: "Waiting for connection",
  sending: "Sending\u2026",
  sent: "Sent",
  failed: "Not sent",
};

function renderMessage(record) {
  const own = record.senderId === model.session.userId;
  const item = el("li", {
    class: `bubble ${own ? "own" : "theirs"}`,
    "data-state": own ? record.state : "received",
    "data-message-id": record.messageId ?? "",
    "data-client-message-id": record.clientMessageId ?? "",
  });
  const meta = el(
    "div",
    { class: "meta" },
    el("span", { class: "sender" }, own ? "You" : record.senderId),
  );
  const at = record.timestamp ?? record.createdAt?.toISOString();
  if (at)
    meta.append(el("time", { datetime: at, title: new Date(at).toLocaleString() }, formatTime(at)));
  if (own) {
    const label = STATE_LABELS[record.state] ?? record.state;
    meta.append(
      el("span", { class: "delivery" }, record.state === "sent" ? `\u2713 ${label}` : label),
    );
  }
  item.append(meta, el("div", { class: "content" }, record.content));
  if (record.state === "failed") {
    const reason = record.error ? `${record.error.code}: ${record.error.message}` : "refused";
    const dismiss = el("button", { type: "button", class: "link-button" }, "Remove");
    dismiss.addEventListener("click", () => {
      model.chats.get(model.openChatId)?.messages.delete(record.key);
      render();
    });
    item.append(el("div", { class: "failure" }, `${reason} `, dismiss));
  }
  return item;
}

function setConnectionPill(state) {
  const pill = $("connection");
  pill.dataset.state = state;
  const labels = {
    idle: "Connecting\u2026",
    connecting: "Connecting\u2026",
    open: "Signing in\u2026",
    online: "Online",
    stopped: "Signed out",
  };
  if (state === "waiting") {
    const seconds = Math.max(0, Math.ceil((model.retryAt - Date.now()) / 1000));
    pill.textContent =
      seconds > 0 ? `Offline, retrying in ${seconds} s` : "Offline, retrying\u2026";
  } else {
    pill.textContent = labels[state] ?? state;
  }
}

function showError(frame) {
  const parts = [frame.message ?? "The server reported an error."];
  if (frame.field) parts.push(`(field: ${frame.field})`);
  if (frame.retry_after_ms) parts.push(`Retry in ${Math.ceil(frame.retry_after_ms / 1000)} s.`);
  const toast = el(
    "div",
    { class: "toast", "data-code": frame.code ?? "" },
    el("strong", {}, frame.code ?? "error"),
    ` ${parts.join(" ")}`,
  );
  const close = el(
    "button",
    { type: "button", class: "icon-button", "aria-label": "Dismiss" },
    "\u00d7",
  );
  close.addEventListener("click", () => toast.remove());
  toast.append(close);
  const errors = $("errors");
  errors.append(toast);
  while (errors.children.length > 3) errors.firstElementChild.remove();
  setTimeout(() => toast.remove(), ERROR_TOAST_MS);
}

// ---------------------------------------------------------------------------- frame log

function logFrame({ direction, text, frame, at }) {
  const list = $("frame-list");
  const log = $("frame-log");
  const stick = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const pretty = frame ? JSON.stringify(frame, shortenTokens, 2) : text;
  const item = el(
    "li",
    { class: `frame ${direction}`, "data-direction": direction, "data-type": frame?.type ?? "" },
    el(
      "div",
      { class: "frame-head" },
      el("span", { class: "direction" }, direction === "in" ? "\u2193 in" : "\u2191 out"),
      el("time", { datetime: at.toISOString() }, formatClock(at)),
      el("span", { class: "frame-type" }, frame?.type ?? "(not JSON)"),
    ),
    el("pre", {}, pretty),
  );
  list.append(item);
  while (list.children.length > MAX_LOGGED_FRAMES) list.firstElementChild.remove();
  log.dataset.count = String(Number(log.dataset.count ?? 0) + 1);
  $("frame-count").textContent = `(${log.dataset.count})`;
  if (stick) list.scrollTop = list.scrollHeight;
}

/** Secrets do not belong on screen: show a token's start and length only. */
function shortenTokens(key, value) {
  if (key === "token" && typeof value === "string" && value.length > 16) {
    return `${value.slice(0, 12)}\u2026 (${value.length} chars)`;
  }
  return value;
}

// ---------------------------------------------------------------------------- helpers

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children); // text goes in as text nodes: message content is never HTML
  return node;
}

function formatTime(iso) {
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

function formatClock(date) {
  const milliseconds = String(date.getMilliseconds()).padStart(3, "0");
  return `${date.toLocaleTimeString([], { hour12: false })}.${milliseconds}`;
}

function autoResize(textarea) {
  textarea.style.height = "auto";
  textarea.style.height = `${Math.min(textarea.scrollHeight, 200)}px`;
}

// ---------------------------------------------------------------------------- wiring

function setUp() {
  $("dev-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const userId = $("user-id").value.trim();
    $("dev-sign-in").disabled = true;
    try {
      await signInWithDevToken(userId);
    } catch (error) {
      $("sign-in-error").textContent = error.message;
    } finally {
      $("dev-sign-in").disabled = false;
    }
  });
  $("jwt-form").addEventListener("submit", (event) => {
    event.preventDefault();
    try {
      signInWithJwt($("jwt").value.trim());
    } catch (error) {
      $("sign-in-error").textContent = error.message;
    }
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("back").addEventListener("click", () => {
    document.body.classList.remove("conversation-open");
    model.openChatId = null;
    render();
  });
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    const recipient = $("new-chat-user").value.trim();
    if (recipient) model.pendingOpen = model.client.createChat(recipient);
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    sendTypedMessage();
  });
  const input = $("message-input");
  input.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; never interrupt an IME composition.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendTypedMessage();
    }
  });
  input.addEventListener("input", () => autoResize(input));
  $("load-older").addEventListener("click", () => {
    const entry = model.chats.get(model.openChatId);
    const oldest = entry && oldestMessage(entry);
    if (oldest)
      model.client.fetchMessages(entry.chat.chat_id, {
        before: oldest.messageId,
        limit: HISTORY_PAGE,
      });
  });
  $("clear-log").addEventListener("click", () => {
    $("frame-list").replaceChildren();
    $("frame-log").dataset.count = "0";
    $("frame-count").textContent = "(0)";
  });
  document.addEventListener("visibilitychange", () => {
    markRead();
    render();
  });
  setInterval(() => {
    if (model.client?.state === "waiting") setConnectionPill("waiting");
  }, 1000);

  const saved = sessionStorage.getItem(SESSION_KEY);
  if (saved) startSession(JSON.parse(saved));
}

setUp();
