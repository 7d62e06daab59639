/**
 * app.js: the browser chat UI.
 *
 * Every protocol concern (socket, reconnect, keep-alive, tokens, safe resends, the chat model
 * with its messages, marks and unread counts) lives in chat-client.js; this file renders that
 * model and turns what the person does into client calls. What it keeps itself is only what is
 * about the screen: the open chat, the "new messages" divider, the message being edited, drafts.
 * Typing indicators, presence and blocks come from the client's model too; the composer only
 * tells the client when the person types (the client throttles what goes on the wire).
 * Rendering rebuilds the visible lists from the model, batched per animation frame, reusing the
 * DOM node of every bubble whose content did not change.
 */
import {
  ChatClient,
  MAX_MESSAGE_CHARS,
  characterCount,
  errorSentence,
  fetchDevToken,
  jwtClaims,
  parseUserIds,
} from "./chat-client.js";

const SESSION_KEY = "chat.session"; // sessionStorage: survives a reload, not a closed tab
const OPEN_CHAT_KEY = "chat.openChat"; // sessionStorage: the chat this tab shows
const MAX_LOGGED_FRAMES = 500;
const ERROR_TOAST_MS = 20_000;
const NOTICE_TOAST_MS = 8_000;
const MAX_TITLE_CHARS = 128; // the protocol's limit on a group's title
const MAX_USER_ID_CHARS = 128;
const COUNTER_FROM = MAX_MESSAGE_CHARS - 500; // show the character counter this close to the limit
const GROUP_GAP_MS = 5 * 60_000; // bubbles of one sender this close together form a group
const NEAR_BOTTOM_PX = 80;
const CLOCK_TICK_MS = 30_000; // "last seen 5 minutes ago" and day labels follow the clock

const $ = (id) => document.getElementById(id);

const model = {
  session: null, // {token, userId, dev}
  client: null,
  openChatId: null,
  divider: null, // {chatId, afterSeq, untilSeq}: the messages that were unread on opening
  dividerPending: false, // the chat was opened before its chat object arrived
  initialScroll: null, // "divider" or "end", done once the opened chat's history is there
  seenSeq: 0, // the newest message of the open chat that was on screen at the bottom
  editing: null, // {chatId, messageId, seq, stash}: the message the composer is editing
  menuFor: null, // {chatId, message} of the open message menu
  menuButton: null, // the bubble button that opened it
  chatMenuFor: null, // chat_id whose chat menu (block, unblock) is open
  focusAfterUnblock: false, // the bar's Unblock was pressed: the composer gets the focus back
  pendingOpen: null, // request_id of the create_chat whose reply should open that chat
  pendingGroup: null, // request_id of the create_group of the new-group dialog
  pendingAdd: null, // {requestId, chatId, userIds} of the add_members of the members panel
  pendingRemove: new Map(), // request_id -> {chatId, userId} of remove_member requests
  membersFor: null, // chat_id whose members panel is open
  readersFor: null, // {chatId, seq} whose "read by" list is open
  retryAt: null,
  drafts: {}, // chat_id -> unsent text of the composer
  reported: new Set(), // request_ids of errors already shown on a bubble or by their own toast
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
  model.drafts = readJson(localStorage, draftsKey(), {});
  const client = new ChatClient({
    url: "/ws",
    token: session.token,
    // Dev tokens can be re-issued by the server; a pasted JWT cannot be refreshed by us.
    getToken: session.dev ? () => fetchDevToken(session.userId) : null,
    // Unsent messages survive a reload; the server deduplicates the resend.
    storage: localStorage,
    storageKey: `chat.outbox.${session.userId}`,
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
  const reopen = sessionStorage.getItem(OPEN_CHAT_KEY);
  if (reopen) openChat(reopen, { focus: false });
  render();
}

function signOut(reason = "") {
  model.client?.stop();
  model.client = null;
  model.session = null;
  model.openChatId = null;
  model.divider = null;
  model.editing = null;
  closeMenu();
  closeChatMenu();
  closeReaders();
  for (const id of ["group-dialog", "members-dialog", "group-confirm", "delete-dialog"]) {
    if ($(id).open) $(id).close();
  }
  bubbleCache.clear(); // a cached bubble is "own" for the previous user
  sessionStorage.removeItem(SESSION_KEY);
  sessionStorage.removeItem(OPEN_CHAT_KEY);
  $("chat").hidden = true;
  $("sign-in").hidden = false;
  $("whoami").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-error").textContent = reason;
  document.body.classList.remove("conversation-open");
  setConnectionPill("stopped");
  render();
}

function draftsKey() {
  return `chat.drafts.${model.session.userId}`;
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
    render();
  });
  on("change", () => render());
  on("all_chats", () => {
    // A remembered chat that is not among the user's chats any more: back to the list.
    if (model.openChatId && !client.chat(model.openChatId)?.known) closeChat();
    placeDivider();
  });
  on("new_chats", (frame) => {
    placeDivider();
    if (frame.request_id !== undefined && frame.request_id === model.pendingOpen) {
      model.pendingOpen = null;
      $("new-chat-user").value = "";
      openChat(frame.data[0].chat_id);
    }
    if (frame.request_id !== undefined && frame.request_id === model.pendingGroup) {
      model.pendingGroup = null;
      $("group-dialog").close();
      if (frame.data?.[0]) openChat(frame.data[0].chat_id);
    }
  });
  on("chat_updated", (frame) => {
    const add = model.pendingAdd;
    if (add && frame.request_id !== undefined && frame.request_id === add.requestId) {
      model.pendingAdd = null;
      const members = new Set(frame.data?.participants ?? []);
      const added = add.userIds.filter((user) => members.has(user));
      $("add-members-input").value = "";
      $("add-members-button").disabled = false;
      $("members-status").textContent = added.length
        ? `Added ${added.join(", ")}.`
        : "Everyone you named is in the group already.";
    }
    model.pendingRemove.delete(frame.request_id);
    renderMembers();
  });
  on("chat-removed", ({ chatId, title, kind, left }) => {
    if (model.openChatId === chatId) closeChat();
    if (model.membersFor === chatId) $("members-dialog").close();
    if (model.readersFor?.chatId === chatId) closeReaders();
    delete model.drafts[chatId];
    if (kind !== "group") return;
    const name = title ? `\u201c${title}\u201d` : "the group";
    showNotice(left ? `You left ${name}.` : `You are no longer a member of ${name}.`);
  });
  on("outbox", ({ entry }) => {
    if (entry.state === "failed") model.reported.add(entry.requestId);
    if (entry.state === "failed" && entry.kind === "send") {
      const chat = client.chat(entry.chatId);
      // The person is in this direct chat, so a refusal can only mean a block is in place.
      if (blockRefused(chat, entry.error)) showBlockedNotice(chat);
    }
    // What the person just sent here stays in view (not what another device of theirs sent).
    const own = entry.kind === "send" && entry.chatId === model.openChatId;
    if (entry.state === "failed" && entry.kind !== "send") {
      showError(
        entry.error,
        entry.kind === "edit" ? "Your edit was not saved." : "The message was not deleted.",
      );
      // Nothing typed is lost: a refused edit goes back to the composer.
      const input = $("message-input");
      if (entry.kind === "edit" && entry.chatId === model.openChatId && !input.value) {
        input.value = entry.frame.content;
        composerChanged();
      }
    }
    render({ scrollToEnd: own && entry.state === "sent" });
  });
  on("error", (frame) => {
    if (frame.request_id !== undefined && frame.request_id === model.pendingOpen)
      model.pendingOpen = null;
    // Errors of the group dialogs are shown in them, next to what the person typed.
    if (groupRequestFailed(frame)) return;
    // A refused send is shown on its bubble, a refused change by its own toast.
    if (!model.reported.delete(frame.request_id)) showError(frame);
    if (frame.code === "forbidden" || frame.code === "not_found") {
      if (model.openChatId && !client.chat(model.openChatId)?.known) closeChat();
    }
  });
  on("blocked", () => {
    // Another device may have changed the list: the open chat's menu must not show stale state.
    closeChatMenu();
    render();
  });
  on("auth-failed", ({ message }) => signOut(message));
}

// ---------------------------------------------------------------------------- actions

function openChat(chatId, { focus = true } = {}) {
  if (model.openChatId !== chatId) {
    stopEditing(); // the draft from before the edit comes back, and is kept
    saveDraft();
    stopTyping();
    closeChatMenu();
    const chat = model.client.chat(chatId);
    model.openChatId = chatId;
    model.divider = null;
    model.dividerPending = true;
    placeDivider();
    model.initialScroll = model.divider ? "divider" : "end";
    model.seenSeq = chat?.newest ?? 0;
    sessionStorage.setItem(OPEN_CHAT_KEY, chatId);
    const input = $("message-input");
    input.value = model.drafts[chatId] ?? "";
    composerChanged({ save: false });
  }
  document.body.classList.add("conversation-open");
  model.client.openChat(chatId);
  updateViewing();
  closeMenu();
  closeReaders();
  render({ scrollToEnd: model.initialScroll === "end" });
  if (focus) {
    const input = $("message-input");
    input.disabled = false;
    input.focus();
  }
}

/**
 * Where "new messages" starts: after the read mark the chat had when it was opened, before
 * the client marked it read. Placed once, as soon as the chat's object is there.
 */
function placeDivider() {
  const chat = model.openChatId && model.client.chat(model.openChatId);
  if (!model.dividerPending || !chat?.known) return;
  model.dividerPending = false;
  const afterSeq = chat.readUpTo[model.session.userId] ?? 0;
  if (chat.newest > afterSeq) {
    model.divider = { chatId: chat.chatId, afterSeq, untilSeq: chat.newest };
    model.initialScroll = "divider";
  }
}

function closeChat() {
  stopEditing();
  saveDraft();
  stopTyping();
  closeMenu();
  closeChatMenu();
  closeReaders();
  model.openChatId = null;
  model.divider = null;
  model.dividerPending = false;
  sessionStorage.removeItem(OPEN_CHAT_KEY);
  document.body.classList.remove("conversation-open");
  updateViewing();
  render();
}

/** Tell the client which chat is on screen: that one is kept read. */
function updateViewing() {
  const visible = document.visibilityState === "visible";
  model.client?.setViewing(visible ? model.openChatId : null);
  if (!visible) stopTyping(); // a hidden page is not typing
}

/** The composer changed by the person's hand: they are typing, or stopped (cleared it). */
function noteTyping() {
  const chat = model.openChatId && model.client?.chat(model.openChatId);
  if (!chat?.known || model.editing || blockedPeer(chat)) return;
  model.client.typing(chat.chatId, $("message-input").value.trim() !== "");
}

/** The person stopped typing in the open chat (sent, left it, or started an edit). */
function stopTyping() {
  if (model.openChatId) model.client?.typing(model.openChatId, false);
}

function submitComposer() {
  const input = $("message-input");
  const chat = model.client.chat(model.openChatId);
  const content = input.value;
  if (!chat || !content.trim()) return;
  if (characterCount(content) > MAX_MESSAGE_CHARS) {
    composerChanged();
    return;
  }
  if (model.editing) {
    const { chatId, messageId, original, stash } = model.editing;
    if (content !== original) model.client.editMessage({ chatId, messageId, content });
    model.editing = null;
    input.value = stash;
  } else {
    model.client.sendMessage({
      chatId: chat.chatId,
      // A group message goes to every member: it has no recipient.
      recipientId: isGroup(chat) ? null : otherParticipant(chat),
      content,
    });
    input.value = "";
    model.divider = null; // replying means everything above has been read
    stopTyping();
  }
  composerChanged();
  render({ scrollToEnd: true });
}

function startEditing(chatId, message) {
  const input = $("message-input");
  const pending = model.client.pendingChange(chatId, message.message_id);
  const current = pending?.kind === "edit" ? pending.frame.content : message.content;
  const stash = model.editing ? model.editing.stash : input.value;
  stopTyping(); // editing an old message is not writing a new one
  model.editing = {
    chatId,
    messageId: message.message_id,
    seq: message.seq,
    original: current,
    stash,
  };
  input.value = current;
  composerChanged({ save: false });
  input.focus();
  input.setSelectionRange(input.value.length, input.value.length);
  render();
}

/** Leave editing; the composer gets back what it held before. */
function stopEditing() {
  if (!model.editing) return;
  $("message-input").value = model.editing.stash;
  model.editing = null;
  composerChanged();
  render();
}

/** The person's newest own message in the open chat that can still be edited. */
function lastEditableMessage() {
  const me = model.session.userId;
  const messages = model.client.messages(model.openChatId);
  for (let index = messages.length - 1; index >= 0; index -= 1) {
    const message = messages[index];
    if (message.sender_id === me && !message.deleted) return message;
  }
  return null;
}

function saveDraft() {
  const chatId = model.openChatId;
  if (!chatId || !model.session || model.editing) return;
  const text = $("message-input").value;
  if (text) model.drafts[chatId] = text;
  else delete model.drafts[chatId];
  try {
    localStorage.setItem(draftsKey(), JSON.stringify(model.drafts));
  } catch {
    // Storage full: the draft stays in memory.
  }
}

/** The composer's text changed: size, counter, draft. */
function composerChanged({ save = true } = {}) {
  const input = $("message-input");
  autoResize(input);
  const count = characterCount(input.value);
  const counter = $("char-count");
  const over = count - MAX_MESSAGE_CHARS;
  counter.hidden = count < COUNTER_FROM;
  counter.classList.toggle("over", over > 0);
  counter.textContent =
    over > 0
      ? `${count} / ${MAX_MESSAGE_CHARS}: ${over} too many`
      : `${count} / ${MAX_MESSAGE_CHARS}`;
  $("send-button").disabled = !model.openChatId || over > 0;
  $("composer-status").textContent =
    over > 0 ? "Too long to send: shorten it or split it into several messages." : "";
  if (save) saveDraft();
}

// ---------------------------------------------------------------------------- message menu

function openMenu(target, chatId, message, at = null) {
  const menu = $("message-menu");
  model.menuFor = { chatId, message };
  closeChatMenu();
  // While the person blocks the other side there is no composer to edit in (deleting stays).
  const blocked = Boolean(blockedPeer(model.client.chat(chatId)));
  menu.querySelector('[data-action="edit"]').hidden = blocked;
  menu.hidden = false;
  const box = target.getBoundingClientRect();
  const width = menu.offsetWidth;
  const height = menu.offsetHeight;
  let left = at ? at.x : box.right - width;
  let top = at ? at.y : box.bottom + 4;
  left = Math.max(8, Math.min(left, window.innerWidth - width - 8));
  if (top + height > window.innerHeight - 8) top = Math.max(8, (at ? at.y : box.top) - height - 4);
  menu.style.left = `${left}px`;
  menu.style.top = `${top}px`;
  menu.querySelector("button").focus();
}

function closeMenu() {
  model.menuButton?.removeAttribute("aria-expanded");
  model.menuButton = null;
  model.menuFor = null;
  $("message-menu").hidden = true;
}

// ---------------------------------------------------------------------------- chat menu, blocks

/** The other side of a direct chat when the person blocks them, else null. */
function blockedPeer(chat) {
  if (!chat || isGroup(chat) || !model.client) return null;
  const peer = otherParticipant(chat);
  return model.client.isBlocked(peer) ? peer : null;
}

/** A refused send in a direct chat: the person is a participant, so a block is in place. */
function blockRefused(chat, error) {
  return Boolean(chat?.known && !isGroup(chat) && error?.code === "forbidden");
}

/** Who blocks whom, as the person needs to read it: they know only their own blocks. */
function blockSentence(chat) {
  const peer = otherParticipant(chat);
  return model.client.isBlocked(peer)
    ? `You blocked ${peer}. Unblock to send messages.`
    : `${peer} has blocked you.`;
}

function showBlockedNotice(chat) {
  const peer = otherParticipant(chat);
  const why = model.client.isBlocked(peer)
    ? blockSentence(chat)
    : `${blockSentence(chat)} You cannot send ${peer} messages while they do.`;
  const text = el(
    "div",
    { class: "toast-text" },
    el("strong", {}, "Message not sent"),
    el("span", {}, why),
  );
  const toast = el("div", { class: "toast", "data-code": "forbidden", "data-reason": "blocked" });
  toast.append(text);
  addToast(toast, ERROR_TOAST_MS);
}

function openChatMenu() {
  const chat = model.openChatId && model.client.chat(model.openChatId);
  if (!chat?.known || isGroup(chat)) return;
  closeMenu();
  closeReaders();
  const menu = $("chat-menu");
  const button = $("chat-menu-button");
  const blocked = Boolean(blockedPeer(chat));
  menu.querySelector('[data-action="block"]').hidden = blocked;
  menu.querySelector('[data-action="unblock"]').hidden = !blocked;
  model.chatMenuFor = chat.chatId;
  menu.hidden = false;
  button.setAttribute("aria-expanded", "true");
  const box = button.getBoundingClientRect();
  const width = menu.offsetWidth;
  const left = Math.max(8, Math.min(box.right - width, window.innerWidth - width - 8));
  menu.style.left = `${left}px`;
  menu.style.top = `${box.bottom + 4}px`;
  menu.querySelector("button:not([hidden])").focus();
}

function closeChatMenu() {
  model.chatMenuFor = null;
  $("chat-menu").hidden = true;
  $("chat-menu-button").removeAttribute("aria-expanded");
}

async function chatMenuAction(action) {
  const chat = model.chatMenuFor && model.client.chat(model.chatMenuFor);
  closeChatMenu();
  if (!chat) return;
  const peer = otherParticipant(chat);
  if (action === "unblock") {
    model.client.unblockUser(peer);
    return;
  }
  const ok = await confirmAction({
    title: `Block ${peer}?`,
    text:
      `${peer} will not be able to message you or see when you are online, and you will not ` +
      "see when they are. The chat stays; you can unblock at any time.",
    action: "Block",
  });
  if (!ok || !model.client) return;
  model.client.typing(chat.chatId, false);
  model.client.blockUser(peer);
}

async function menuAction(action) {
  const target = model.menuFor;
  closeMenu();
  if (!target) return;
  const { chatId, message } = target;
  if (action === "edit") {
    startEditing(chatId, message);
  } else if (action === "copy") {
    if (navigator.clipboard) await navigator.clipboard.writeText(message.content).catch(() => {});
    $("message-input").focus();
  } else if (action === "delete") {
    const dialog = $("delete-dialog");
    dialog.returnValue = "";
    dialog.showModal();
    dialog.addEventListener(
      "close",
      () => {
        if (dialog.returnValue === "delete") {
          if (model.editing?.messageId === message.message_id) stopEditing();
          model.client.deleteMessage({ chatId, messageId: message.message_id });
        }
        $("message-input").focus();
      },
      { once: true },
    );
  }
}

// ---------------------------------------------------------------------------- groups

/** The user ids of the new-group dialog: its chips, then what is still typed in the field. */
function groupMembers() {
  const chips = [...$("group-chips").querySelectorAll(".chip")].map((chip) => chip.dataset.user);
  return [...new Set([...chips, ...parseUserIds($("group-member-input").value)])];
}

function addChip(user) {
  const box = $("group-chips");
  if (box.querySelector(`.chip[data-user="${CSS.escape(user)}"]`)) return;
  const remove = el(
    "button",
    { type: "button", class: "chip-remove", "aria-label": `Remove ${user}` },
    "\u00d7",
  );
  const chip = el(
    "span",
    { class: "chip", "data-user": user, style: `--hue: ${hue(user)}` },
    el("span", { class: "chip-name" }, user),
    remove,
  );
  remove.addEventListener("click", () => {
    chip.remove();
    $("group-member-input").focus();
  });
  box.insertBefore(chip, $("group-member-input"));
}

/** Typed separators turn what is before them into chips; `all` takes the rest too. */
function chipsFromInput({ all = false } = {}) {
  const input = $("group-member-input");
  const parts = input.value.split(/[\s,;]+/u);
  const rest = all ? "" : parts.pop();
  for (const user of parts.filter(Boolean)) addChip(user);
  if (input.value !== rest) input.value = rest;
}

function openGroupDialog() {
  const dialog = $("group-dialog");
  model.pendingGroup = null;
  $("group-form").reset();
  for (const chip of $("group-chips").querySelectorAll(".chip")) chip.remove();
  for (const id of ["group-title-error", "group-members-error", "group-error"]) {
    $(id).textContent = "";
  }
  $("group-create").disabled = false;
  $("group-create").textContent = "Create group";
  dialog.showModal();
  $("group-title").focus();
}

/** Check what the person typed (the server would refuse it anyway), then `create_group`. */
function submitGroup() {
  chipsFromInput({ all: true });
  const title = $("group-title").value.trim();
  const me = model.session.userId;
  const members = groupMembers();
  const tooLong = members.find((user) => [...user].length > MAX_USER_ID_CHARS);
  let titleError = "";
  let membersError = "";
  if (!title) titleError = "Give the group a name.";
  else if ([...title].length > MAX_TITLE_CHARS)
    titleError = `The name is too long: at most ${MAX_TITLE_CHARS} characters.`;
  if (members.length === 0) membersError = "Add at least one member by user id.";
  else if (members.includes(me))
    membersError = `You (${me}) are in the group already: name the others only.`;
  else if (tooLong) membersError = `\u201c${tooLong.slice(0, 20)}\u2026\u201d is not a user id.`;
  $("group-title-error").textContent = titleError;
  $("group-members-error").textContent = membersError;
  $("group-error").textContent = "";
  $("group-title").setAttribute("aria-invalid", String(Boolean(titleError)));
  $("group-member-input").setAttribute("aria-invalid", String(Boolean(membersError)));
  if (titleError) {
    $("group-title").focus();
    return;
  }
  if (membersError) {
    $("group-member-input").focus();
    return;
  }
  $("group-create").disabled = true;
  $("group-create").textContent = "Creating\u2026";
  model.pendingGroup = model.client.createGroup({ title, memberIds: members });
}

/** The sentence for a refused group request, with the server's own details. */
function refusal(frame) {
  return [errorSentence(frame), frame.message].filter(Boolean).join(" ");
}

/** An error answering one of the group requests: shown where it was made; true if it was. */
function groupRequestFailed(frame) {
  const requestId = frame.request_id;
  if (requestId === undefined || requestId === null) return false;
  if (requestId === model.pendingGroup) {
    model.pendingGroup = null;
    $("group-create").disabled = false;
    $("group-create").textContent = "Create group";
    const where =
      frame.field === "title"
        ? "group-title-error"
        : frame.field === "member_ids"
          ? "group-members-error"
          : "group-error";
    $(where).textContent = refusal(frame);
    if (!$("group-dialog").open) showError(frame, "The group was not created.");
    return true;
  }
  if (requestId === model.pendingAdd?.requestId) {
    model.pendingAdd = null;
    $("add-members-button").disabled = false;
    $("members-status").textContent = "";
    $("members-error").textContent = refusal(frame);
    if (!$("members-dialog").open) showError(frame, "Nobody was added.");
    return true;
  }
  const removal = model.pendingRemove.get(requestId);
  if (removal) {
    model.pendingRemove.delete(requestId);
    const me = model.session.userId;
    const heading =
      removal.userId === me ? "You did not leave the group." : `${removal.userId} was not removed.`;
    if ($("members-dialog").open) {
      $("members-error").textContent = `${heading} ${refusal(frame)}`;
      renderMembers();
    } else {
      showError(frame, heading);
    }
    return true;
  }
  return false;
}

function openMembers() {
  const chat = model.openChatId && model.client.chat(model.openChatId);
  if (!isGroup(chat)) return;
  closeReaders();
  model.membersFor = chat.chatId;
  $("members-error").textContent = "";
  $("members-status").textContent = "";
  $("add-members-input").value = "";
  $("add-members-button").disabled = false;
  renderMembers();
  $("members-dialog").showModal();
  $("members-close").focus();
}

/** The members panel, from the model: shown again whenever the chat changes. */
function renderMembers() {
  if (!model.membersFor || !model.client) return;
  const chat = model.client.chat(model.membersFor);
  if (!chat?.known) return;
  const me = model.session.userId;
  const name = chatName(chat);
  $("members-title").textContent = name;
  $("members-count").textContent = memberCountLabel(chat);
  const avatarNode = $("members-avatar");
  avatarNode.textContent = initials(name);
  avatarNode.style.setProperty("--hue", hue(name));
  const creator = chat.createdBy;
  const iAmCreator = creator === me;
  // The person first, then the creator, then everyone else by user id.
  const rank = (user) => (user === me ? 0 : user === creator ? 1 : 2);
  const members = [...chat.participants].sort(
    (a, b) => rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0),
  );
  const removing = new Set([...model.pendingRemove.values()].map((entry) => entry.userId));
  const items = members.map((user) => {
    const tags = el("span", { class: "member-tags" });
    if (user === creator) tags.append(el("span", { class: "role" }, "creator"));
    const item = el(
      "li",
      { class: "member", "data-user": user },
      avatar(user),
      el(
        "span",
        { class: "member-name" },
        el("span", { class: "member-id" }, user),
        ...(user === me ? [el("span", { class: "muted" }, " (you)")] : []),
      ),
      tags,
    );
    if (iAmCreator && user !== me) {
      const remove = el(
        "button",
        { type: "button", class: "member-remove", "aria-label": `Remove ${user}` },
        removing.has(user) ? "Removing\u2026" : "Remove",
      );
      remove.disabled = removing.has(user);
      remove.addEventListener("click", () => confirmRemove(chat.chatId, user));
      item.append(remove);
    }
    return item;
  });
  $("member-list").replaceChildren(...items);
  $("leave-group").disabled = removing.has(me);
}

function submitAddMembers() {
  const chatId = model.membersFor;
  const chat = chatId && model.client.chat(chatId);
  if (!chat) return;
  const input = $("add-members-input");
  const users = parseUserIds(input.value);
  const me = model.session.userId;
  $("members-status").textContent = "";
  let problem = "";
  if (users.length === 0) problem = "Type the user ids to add, separated by commas or spaces.";
  else if (users.some((user) => [...user].length > MAX_USER_ID_CHARS))
    problem = "That is not a user id: at most 128 characters each.";
  const fresh = users.filter((user) => user !== me && !chat.participants.includes(user));
  if (!problem && fresh.length === 0) problem = "Everyone you named is in the group already.";
  $("members-error").textContent = problem;
  if (problem) {
    input.focus();
    return;
  }
  $("add-members-button").disabled = true;
  const requestId = model.client.addMembers(chatId, fresh);
  model.pendingAdd = { requestId, chatId, userIds: fresh };
}

/** A yes/no question in a modal dialog; resolves true when the person confirmed. */
function confirmAction({ title, text, action }) {
  const dialog = $("group-confirm");
  $("group-confirm-title").textContent = title;
  $("group-confirm-text").textContent = text;
  $("group-confirm-ok").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function confirmRemove(chatId, user) {
  const chat = model.client.chat(chatId);
  if (!chat) return;
  const ok = await confirmAction({
    title: `Remove ${user}?`,
    text: `${user} leaves \u201c${chatName(chat)}\u201d and gets no more of its messages.`,
    action: "Remove",
  });
  if (!ok || !model.client?.chat(chatId)) return;
  $("members-error").textContent = "";
  const requestId = model.client.removeMember(chatId, user);
  model.pendingRemove.set(requestId, { chatId, userId: user });
  renderMembers();
}

async function confirmLeave() {
  const chatId = model.membersFor;
  const chat = chatId && model.client.chat(chatId);
  if (!chat) return;
  const me = model.session.userId;
  const alone = chat.participants.length <= 1;
  const ok = await confirmAction({
    title: `Leave \u201c${chatName(chat)}\u201d?`,
    text: alone
      ? "You are its last member. Nobody can add you back."
      : "You will get no more of its messages, and it leaves your chat list. " +
        "A member can add you again.",
    action: "Leave group",
  });
  if (!ok || !model.client?.chat(chatId)) return;
  $("members-error").textContent = "";
  const requestId = model.client.leaveChat(chatId);
  model.pendingRemove.set(requestId, { chatId, userId: me });
  renderMembers();
}

/** Who of the others has read one of the person's group messages, next to its bubble. */
function openReaders(button, message) {
  const chat = model.client.chat(message.chat_id);
  if (!chat) return;
  closeMenu();
  model.readersFor = { chatId: chat.chatId, seq: message.seq };
  renderReaders();
  const popover = $("readers-popover");
  popover.hidden = false;
  const box = button.getBoundingClientRect();
  const width = popover.offsetWidth;
  const height = popover.offsetHeight;
  const left = Math.max(8, Math.min(box.right - width, window.innerWidth - width - 8));
  let top = box.bottom + 6;
  if (top + height > window.innerHeight - 8) top = Math.max(8, box.top - height - 6);
  popover.style.left = `${left}px`;
  popover.style.top = `${top}px`;
  popover.focus();
}

function renderReaders() {
  const target = model.readersFor;
  if (!target || !model.client) return;
  const chat = model.client.chat(target.chatId);
  const message = chat?.messages.get(target.seq);
  if (!message) {
    closeReaders();
    return;
  }
  const readers = model.client.readers(chat.chatId, message);
  const me = model.session.userId;
  const waiting = chat.participants.filter((user) => user !== me && !readers.includes(user));
  $("readers-heading").textContent = `Read by ${readers.length} of ${readers.length + waiting.length}`;
  $("readers-list").replaceChildren(
    ...readers.map((user) =>
      el(
        "li",
        { class: "reader", "data-user": user },
        avatar(user),
        el("span", { class: "reader-name" }, user),
      ),
    ),
  );
  $("readers-waiting").textContent = waiting.length ? `Not read yet: ${waiting.join(", ")}` : "";
}

function closeReaders() {
  model.readersFor = null;
  $("readers-popover").hidden = true;
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
    if (!model.session || !model.client) return;
    renderChatList();
    renderConversation();
    renderMembers();
    renderReaders();
  });
}

function otherParticipant(chat) {
  const me = model.session.userId;
  return chat.participants.find((user) => user !== me) ?? me;
}

function chatName(chat) {
  return chat.title ?? otherParticipant(chat);
}

function isGroup(chat) {
  return chat?.kind === "group";
}

function memberCountLabel(chat) {
  const count = chat.participants.length;
  return count === 1 ? "1 member" : `${count} members`;
}

/** "bob is typing…", "alice and bob are typing…", or "" when nobody is. */
function typingLabel(chat) {
  const client = model.client;
  const names = client.typists(chat.chatId).filter((user) => !client.isBlocked(user));
  const [first, second, third] = names;
  if (names.length === 0) return "";
  if (names.length === 1) return `${first} is typing\u2026`;
  if (names.length === 2) return `${first} and ${second} are typing\u2026`;
  if (names.length === 3) return `${first}, ${second} and ${third} are typing\u2026`;
  return `${first}, ${second} and ${names.length - 2} others are typing\u2026`;
}

/** The other side of a direct chat is online (and not blocked): the green dot. */
function peerOnline(chat) {
  if (isGroup(chat) || blockedPeer(chat)) return false;
  return model.client.presence(otherParticipant(chat))?.online === true;
}

/** The header's presence line of a direct chat: "online", "last seen …", or "". */
function presenceLabel(chat) {
  if (isGroup(chat) || blockedPeer(chat)) return "";
  const presence = model.client.presence(otherParticipant(chat));
  if (!presence) return "";
  if (presence.online) return "online";
  return presence.lastSeen ? lastSeenLabel(presence.lastSeen) : "";
}

/** Sends of this chat not stored yet, in the order they were typed. */
function unsentOf(chatId) {
  return [...model.client.outbox, ...model.client.failed]
    .filter((entry) => entry.kind === "send" && entry.chatId === chatId)
    .sort((a, b) => a.createdAt - b.createdAt);
}

function lastActivity(chat) {
  const unsent = unsentOf(chat.chatId).at(-1);
  const stored = chat.lastMessage?.timestamp ?? chat.createdAt ?? "";
  const local = unsent ? unsent.createdAt.toISOString() : "";
  return local > stored ? local : stored;
}

function renderChatList() {
  const client = model.client;
  const me = model.session.userId;
  const chats = client.chatList().sort((a, b) => {
    const [x, y] = [lastActivity(a), lastActivity(b)];
    return x < y ? 1 : x > y ? -1 : 0;
  });
  const items = chats.map((chat) => {
    const name = chatName(chat);
    const unsent = unsentOf(chat.chatId).at(-1);
    const last = chat.lastMessage;
    const button = el("button", {
      type: "button",
      class: "chat-item",
      "data-chat-id": chat.chatId,
    });
    if (chat.chatId === model.openChatId) button.setAttribute("aria-current", "true");
    const preview = el("span", { class: "chat-preview", dir: "auto" });
    let time = last?.timestamp ?? "";
    if (unsent && unsent.createdAt.toISOString() > (last?.timestamp ?? "")) {
      time = unsent.createdAt.toISOString();
      preview.append(
        statusIcon(unsent.state === "failed" ? "failed" : "sending"),
        `You: ${unsent.frame.content}`,
      );
    } else if (!last) {
      preview.append(el("em", {}, "No messages yet"));
    } else if (last.deleted) {
      preview.append(el("em", {}, "Message deleted"));
    } else if (last.sender_id === me) {
      preview.append(statusIcon(receiptOf(chat, last)), `You: ${last.content}`);
    } else if (isGroup(chat)) {
      preview.append(el("span", { class: "preview-sender" }, `${last.sender_id}: `), last.content);
    } else {
      preview.append(last.content);
    }
    const typing = typingLabel(chat);
    if (typing) {
      preview.replaceChildren(typing); // in place of the last message, while it lasts
      preview.classList.add("typing");
    }
    if (isGroup(chat)) button.classList.add("is-group");
    const face = avatar(name);
    if (peerOnline(chat)) face.classList.add("online");
    button.append(
      face,
      el("span", { class: "chat-name" }, ...(isGroup(chat) ? [peopleIcon()] : []), name),
      el("span", { class: "chat-time" }, time ? formatListTime(time) : ""),
      preview,
    );
    if (chat.unread > 0) {
      button.classList.add("has-unread");
      button.append(
        el("span", { class: "badge", "aria-label": `${chat.unread} unread` }, String(chat.unread)),
      );
    }
    button.addEventListener("click", () => openChat(chat.chatId));
    return el("li", {}, button);
  });
  $("chat-list").replaceChildren(...items);
  $("no-chats").hidden = chats.length > 0;
  const totalUnread = chats.reduce((sum, chat) => sum + chat.unread, 0);
  document.title = totalUnread > 0 ? `(${totalUnread}) Chat` : "Chat";
}

function receiptOf(chat, message) {
  return model.client.status(chat.chatId, message);
}

function renderConversation() {
  const client = model.client;
  const found = model.openChatId ? client.chat(model.openChatId) : null;
  const chat = found?.known ? found : null;
  const list = $("messages");
  const input = $("message-input");
  input.disabled = !chat;
  $("back").hidden = !model.openChatId;
  $("pick-chat").hidden = Boolean(model.openChatId);
  $("edit-bar").hidden = !model.editing;
  $("composer").classList.toggle("editing", Boolean(model.editing));
  $("send-button").setAttribute("aria-label", model.editing ? "Save" : "Send");
  if (model.editing) $("edit-original").textContent = model.editing.original;
  input.placeholder = model.editing ? "Edit message" : "Message";
  const group = isGroup(chat);
  $("members-button").hidden = !group;
  $("chat-menu-button").hidden = !chat || group;
  $("conversation-heading").classList.toggle("clickable", group);
  if (group) $("conversation-heading").setAttribute("title", "Show the members");
  else $("conversation-heading").removeAttribute("title");
  if (!chat) {
    $("conversation-title").textContent = model.openChatId ? "Loading\u2026" : "Select a chat";
    $("conversation-id").textContent = "";
    $("conversation-id").hidden = false;
    $("conversation-status").hidden = true;
    $("conversation-avatar").hidden = true;
    renderBlocked(null);
    syncChildren($("message-list"), []);
    $("no-messages").hidden = true;
    $("load-older").hidden = true;
    $("jump").hidden = true;
    $("send-button").disabled = true;
    return;
  }
  const name = chatName(chat);
  $("conversation-title").textContent = name;
  $("conversation-id").textContent = group ? memberCountLabel(chat) : `chat ${chat.chatId}`;
  $("conversation-id").classList.toggle("member-count", group);
  // One line under the name: who is typing, else a group's members or the other side's presence.
  const typing = typingLabel(chat);
  const status = typing || (group ? "" : presenceLabel(chat));
  const statusNode = $("conversation-status");
  statusNode.textContent = status;
  statusNode.hidden = !status;
  statusNode.classList.toggle("typing", Boolean(typing));
  statusNode.classList.toggle("online", !typing && status === "online");
  $("conversation-id").hidden = !group || Boolean(typing);
  if (!group) $("conversation-heading").setAttribute("title", `Chat ${chat.chatId}`);
  const avatarNode = $("conversation-avatar");
  avatarNode.hidden = false;
  avatarNode.textContent = initials(name);
  avatarNode.style.setProperty("--hue", hue(name));
  avatarNode.classList.toggle("online", peerOnline(chat));
  $("send-button").disabled = characterCount(input.value) > MAX_MESSAGE_CHARS;
  renderBlocked(chat);

  // Keep what the person is reading in place: remember the first bubble on screen.
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < NEAR_BOTTOM_PX;
  const anchor = nearBottom ? null : firstVisibleItem(list);

  const items = conversationItems(chat);
  $("load-older").hidden = !client.hasOlder(chat.chatId);
  $("load-older").disabled = Boolean(chat.olderRequest);
  $("load-older").textContent = chat.olderRequest ? "Loading\u2026" : "Load older messages";
  $("no-messages").hidden = items.length > 0 || chat.newest > 0;
  const nodes = items.map(itemNode);
  syncChildren($("message-list"), nodes);

  const ready = chat.loaded || chat.newest === 0;
  if (model.initialScroll && ready) {
    const divider =
      model.initialScroll === "divider" && $("message-list").querySelector(".divider");
    if (divider) list.scrollTop = Math.max(0, divider.offsetTop - 12);
    else list.scrollTop = list.scrollHeight;
    model.initialScroll = null;
    scrollQueued = false;
    model.seenSeq = chat.newest;
  } else if (scrollQueued || nearBottom) {
    list.scrollTop = list.scrollHeight;
    scrollQueued = false;
  } else if (anchor) {
    const node = $("message-list").querySelector(`[data-key="${CSS.escape(anchor.key)}"]`);
    if (node) list.scrollTop = node.offsetTop - anchor.offset;
  }
  updateJump(chat);
}

/**
 * While the person blocks the other side of the open chat, the composer gives way to a line
 * that says so, with the way back.
 */
function renderBlocked(chat) {
  const peer = blockedPeer(chat);
  const composer = $("composer");
  composer.classList.toggle("blocked", Boolean(peer));
  $("blocked-bar").hidden = !peer;
  if (peer) {
    $("blocked-text").textContent = blockSentence(chat);
    $("message-input").disabled = true;
    $("send-button").disabled = true;
    if (model.editing) stopEditing();
  } else if (chat && model.focusAfterUnblock) {
    model.focusAfterUnblock = false;
    $("message-input").focus(); // unblocked from the bar: carry on writing
  }
}

/** The bubbles, date separators and the "new messages" divider of a chat, in order. */
function conversationItems(chat) {
  const client = model.client;
  const me = model.session.userId;
  const group = isGroup(chat);
  const records = client.messages(chat.chatId).map((message) => {
    const own = message.sender_id === me;
    const change = own ? client.pendingChange(chat.chatId, message.message_id) : null;
    return {
      key: keyOf(message),
      message,
      own,
      senderId: message.sender_id,
      at: message.timestamp,
      state: own ? receiptOf(chat, message) : "received",
      change,
      // In a group, who of the others has read one of the person's messages.
      readers: group && own && !message.deleted ? client.readers(chat.chatId, message) : null,
    };
  });
  const held = new Set(records.map((record) => record.key));
  for (const entry of unsentOf(chat.chatId)) {
    const key = `c:${me}:${entry.clientMessageId}`;
    if (held.has(key)) continue;
    records.push({
      key,
      entry,
      own: true,
      senderId: me,
      at: entry.createdAt.toISOString(),
      state: entry.state,
      change: null,
    });
  }
  const items = [];
  const divider = model.divider?.chatId === chat.chatId ? model.divider : null;
  let dividerPlaced = false;
  let previous = null;
  records.forEach((record, index) => {
    const day = dayKey(record.at);
    if (!previous || dayKey(previous.at) !== day) {
      items.push({ kind: "day", key: `day:${day}`, label: dayLabel(record.at) });
      previous = null;
    }
    const message = record.message;
    if (dividerBefore(record, divider, dividerPlaced)) {
      items.push({ kind: "divider", key: "divider" });
      dividerPlaced = true;
      previous = null;
    }
    const next = records[index + 1];
    record.groupStart = !continues(previous, record);
    record.groupEnd = !continues(record, next) || dividerBefore(next ?? {}, divider, dividerPlaced);
    items.push({ kind: "bubble", ...record });
    previous = record;
  });
  return items;
}

function dividerBefore(record, divider, placed) {
  const seq = record.message?.seq;
  return Boolean(
    divider && !placed && seq && !record.own && seq > divider.afterSeq && seq <= divider.untilSeq,
  );
}

function continues(previous, record) {
  if (!previous || !record || previous.senderId !== record.senderId) return false;
  if (dayKey(previous.at) !== dayKey(record.at)) return false;
  return new Date(record.at) - new Date(previous.at) < GROUP_GAP_MS;
}

function keyOf(message) {
  return message.client_message_id
    ? `c:${message.sender_id}:${message.client_message_id}`
    : `s:${message.seq}`;
}

/** The first bubble on screen (separators move when older messages come in above). */
function firstVisibleItem(list) {
  const top = list.getBoundingClientRect().top;
  for (const node of $("message-list").querySelectorAll(":scope > .bubble")) {
    const box = node.getBoundingClientRect();
    if (box.bottom > top) return { key: node.dataset.key, offset: node.offsetTop - list.scrollTop };
  }
  return null;
}

function updateJump(chat) {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < NEAR_BOTTOM_PX;
  if (atBottom) {
    model.seenSeq = Math.max(model.seenSeq, chat.newest);
    $("jump").hidden = true;
    return;
  }
  const me = model.session.userId;
  let arrived = 0;
  for (const message of chat.messages.values()) {
    if (message.seq > model.seenSeq && message.sender_id !== me) arrived += 1;
  }
  $("jump").hidden = arrived === 0;
  $("jump-count").textContent = arrived > 0 ? String(arrived) : "";
}

/** Rendered nodes by item key, rebuilt only when what they show changes. */
const bubbleCache = new Map();

function itemNode(item) {
  const signature = JSON.stringify(
    item.kind === "bubble"
      ? [
          item.state,
          item.groupStart,
          item.groupEnd,
          item.message ?? null,
          item.entry ? [item.entry.frame.content, item.entry.error?.code] : null,
          item.change ? [item.change.kind, item.change.frame.content ?? null] : null,
          item.readers ?? null,
        ]
      : [item.kind, item.label],
  );
  const cached = bubbleCache.get(item.key);
  if (cached?.signature === signature) return cached.node;
  const node =
    item.kind === "bubble"
      ? renderBubble(item)
      : item.kind === "divider"
        ? el(
            "li",
            { class: "divider", "data-key": item.key, role: "separator" },
            el("span", {}, "New messages"),
          )
        : el(
            "li",
            { class: "day-separator", "data-key": item.key, role: "separator" },
            el("span", {}, item.label),
          );
  bubbleCache.set(item.key, { signature, node });
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
  delivered: "Delivered",
  read: "Read",
  failed: "Not sent",
};

function renderBubble(item) {
  const { message, entry, own, change } = item;
  const deleted = Boolean(message?.deleted);
  const classes = ["bubble", own ? "own" : "theirs"];
  if (item.groupStart) classes.push("group-start");
  if (item.groupEnd) classes.push("group-end");
  if (deleted) classes.push("deleted");
  const node = el("li", {
    class: classes.join(" "),
    "data-key": item.key,
    "data-state": item.state,
    "data-message-id": message?.message_id ?? "",
    "data-seq": message ? String(message.seq) : "",
    "data-client-message-id": message?.client_message_id ?? entry?.clientMessageId ?? "",
  });
  if (change) node.dataset.change = change.kind;
  if (!own && item.groupStart) {
    node.append(
      el("span", { class: "sender", style: `--hue: ${hue(item.senderId)}` }, item.senderId),
    );
  }
  let text = message ? message.content : entry.frame.content;
  if (change?.kind === "edit") text = change.frame.content;
  node.append(
    deleted
      ? el("div", { class: "content", dir: "auto" }, "Message deleted")
      : el("div", { class: "content", dir: "auto" }, text),
  );

  const meta = el("span", { class: "meta" });
  if (change) {
    meta.append(
      el("span", { class: "change" }, change.kind === "edit" ? "Saving\u2026" : "Deleting\u2026"),
    );
  } else if (message?.edited_at && !deleted) {
    meta.append(
      el(
        "span",
        { class: "edited", title: `Edited ${new Date(message.edited_at).toLocaleString()}` },
        "edited",
      ),
    );
  }
  if (item.readers?.length > 0) {
    const readBy = el(
      "button",
      {
        type: "button",
        class: "read-by",
        "aria-haspopup": "dialog",
        title: `Read by ${item.readers.join(", ")}`,
      },
      `Read by ${item.readers.length}`,
    );
    readBy.addEventListener("click", (event) => {
      event.stopPropagation();
      openReaders(readBy, message);
    });
    meta.append(readBy);
  }
  const at = item.at;
  meta.append(el("time", { datetime: at, title: new Date(at).toLocaleString() }, formatTime(at)));
  if (own && !deleted) {
    const label = STATE_LABELS[item.state] ?? item.state;
    const delivery = el(
      "span",
      { class: "delivery", "data-status": item.state, title: label },
      statusIcon(item.state),
      el("span", { class: item.state === "queued" ? "delivery-label" : "visually-hidden" }, label),
    );
    meta.append(delivery);
  }
  node.append(meta);

  if (own && message && !deleted) {
    const actions = el(
      "button",
      {
        type: "button",
        class: "bubble-actions",
        "aria-label": "Message actions",
        "aria-haspopup": "menu",
      },
      "\u22ef",
    );
    actions.addEventListener("click", (event) => {
      event.stopPropagation();
      openMenu(node, message.chat_id, message);
      actions.setAttribute("aria-expanded", "true");
      model.menuButton = actions;
    });
    node.addEventListener("contextmenu", (event) => {
      event.preventDefault();
      openMenu(node, message.chat_id, message, { x: event.clientX, y: event.clientY });
    });
    node.append(actions);
  }

  if (entry && entry.state === "failed") {
    const chat = model.client.chat(entry.chatId);
    const blocked = blockRefused(chat, entry.error);
    const reason = blocked
      ? blockSentence(chat)
      : entry.error
        ? errorSentence(entry.error)
        : "The server refused it.";
    const detail = entry.error?.message && !blocked ? ` (${entry.error.message})` : "";
    const retry = el("button", { type: "button", class: "link-button" }, "Retry");
    retry.addEventListener("click", () => model.client.retry(entry.clientMessageId));
    const edit = el("button", { type: "button", class: "link-button" }, "Edit");
    edit.addEventListener("click", () => {
      const input = $("message-input");
      const draft = input.value;
      model.client.discard(entry.clientMessageId);
      stopEditing();
      input.value = draft ? `${entry.frame.content}\n${draft}` : entry.frame.content;
      composerChanged();
      input.focus();
    });
    const dismiss = el("button", { type: "button", class: "link-button" }, "Remove");
    dismiss.addEventListener("click", () => model.client.discard(entry.clientMessageId));
    node.append(
      el(
        "div",
        { class: "failure" },
        el("span", {}, `Not sent: ${reason}${detail} `),
        retry,
        edit,
        dismiss,
      ),
    );
  }
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
const CLOCK = ["M8 2a6 6 0 1 0 0 12A6 6 0 0 0 8 2Z", "M8 5v3.2l2.2 1.4"];
const ICON_PATHS = {
  queued: CLOCK, // not acknowledged by the server yet: a clock
  sending: CLOCK,
  sent: ["M2.5 8.5 6 12l8.5-8.5"], // stored: one tick
  delivered: ["M1 8.5 4.5 12 13 3.5", "M7.6 10.6 9 12l8.5-8.5"], // two ticks
  read: ["M1 8.5 4.5 12 13 3.5", "M7.6 10.6 9 12l8.5-8.5"], // two ticks, coloured
  failed: ["M8 2a6 6 0 1 0 0 12A6 6 0 0 0 8 2Z", "M8 5v3.6", "M8 10.8v.2"],
};

function statusIcon(state) {
  const svg = document.createElementNS(SVG_NS, "svg");
  const wide = state === "delivered" || state === "read";
  svg.setAttribute("viewBox", wide ? "0 0 19 16" : "0 0 16 16");
  svg.setAttribute("class", `tick tick-${state}`);
  svg.setAttribute("aria-hidden", "true");
  for (const d of ICON_PATHS[state] ?? []) {
    const path = document.createElementNS(SVG_NS, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

function avatar(name) {
  return el(
    "span",
    { class: "avatar", "aria-hidden": "true", style: `--hue: ${hue(name)}` },
    initials(name),
  );
}

const PEOPLE_PATH =
  "M9 11a3.5 3.5 0 1 0 0-7 3.5 3.5 0 0 0 0 7Zm7.5 0a3 3 0 1 0 0-6 3 3 0 0 0 0 6ZM2 19c0-3.3 " +
  "3.1-5.5 7-5.5s7 2.2 7 5.5v1H2v-1Zm15.6 1v-1c0-1.9-.8-3.5-2.1-4.6 3.5-.3 6.5 1.4 6.5 4.6v1h-4.4Z";

function peopleIcon() {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", "people-icon");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(SVG_NS, "path");
  path.setAttribute("d", PEOPLE_PATH);
  svg.append(path);
  return svg;
}

function initials(name) {
  const letters = [...name.trim()];
  return (letters[0] ?? "?").toUpperCase();
}

function hue(text) {
  let hash = 0;
  for (const char of text) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  return String(hash % 360);
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

/** A toast for an error frame: what it means in words first, the server's details after. */
function showError(frame, heading = null) {
  const details = [];
  if (frame?.message) details.push(frame.message);
  if (frame?.field) details.push(`Field: ${frame.field}.`);
  if (frame?.retry_after_ms) details.push(`Retry in ${Math.ceil(frame.retry_after_ms / 1000)} s.`);
  const text = el(
    "div",
    { class: "toast-text" },
    el("strong", {}, heading ?? errorSentence(frame)),
    el("span", {}, heading ? [errorSentence(frame), ...details].join(" ") : details.join(" ")),
  );
  addToast(el("div", { class: "toast", "data-code": frame?.code ?? "" }, text), ERROR_TOAST_MS);
}

/** A short notice that is not an error (e.g. the person is no longer in a group). */
function showNotice(text) {
  const toast = el(
    "div",
    { class: "toast notice", role: "status" },
    el("div", { class: "toast-text" }, el("span", {}, text)),
  );
  addToast(toast, NOTICE_TOAST_MS);
}

/** Show a toast with a dismiss button for `lifetimeMs`; at most three at a time. */
function addToast(toast, lifetimeMs) {
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
  setTimeout(() => toast.remove(), lifetimeMs);
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

function readJson(storage, key, fallback) {
  try {
    const value = JSON.parse(storage.getItem(key) ?? "null");
    return value && typeof value === "object" ? value : fallback;
  } catch {
    return fallback;
  }
}

function dayKey(iso) {
  const date = new Date(iso);
  return `${date.getFullYear()}-${date.getMonth() + 1}-${date.getDate()}`;
}

function dayLabel(iso) {
  const date = new Date(iso);
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(iso) === dayKey(today.toISOString())) return "Today";
  if (dayKey(iso) === dayKey(yesterday.toISOString())) return "Yesterday";
  return date.toLocaleDateString([], {
    weekday: "long",
    month: "long",
    day: "numeric",
    ...(date.getFullYear() === today.getFullYear() ? {} : { year: "numeric" }),
  });
}

function formatTime(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function formatListTime(iso) {
  const date = new Date(iso);
  const today = new Date().toDateString() === date.toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleDateString([], { month: "short", day: "numeric" });
}

/**
 * "last seen just now", "… 5 minutes ago", "… today at 18:04", "… yesterday at 09:12",
 * "… 2 Dec" (with the year when it is not this year's), in the person's locale.
 */
function lastSeenLabel(iso, now = new Date()) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return "";
  const ago = now - date;
  if (ago < 60_000) return "last seen just now"; // also a clock a little behind the server's
  if (ago < 60 * 60_000) {
    const minutes = Math.floor(ago / 60_000);
    return `last seen ${minutes} ${minutes === 1 ? "minute" : "minutes"} ago`;
  }
  const yesterday = new Date(now.getFullYear(), now.getMonth(), now.getDate() - 1);
  if (date.toDateString() === now.toDateString()) return `last seen today at ${formatTime(iso)}`;
  if (date.toDateString() === yesterday.toDateString()) {
    return `last seen yesterday at ${formatTime(iso)}`;
  }
  const day = date.toLocaleDateString([], {
    day: "numeric",
    month: "short",
    ...(date.getFullYear() === now.getFullYear() ? {} : { year: "numeric" }),
  });
  return `last seen ${day}`;
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
  $("back").addEventListener("click", () => closeChat());
  $("new-chat").addEventListener("submit", (event) => {
    event.preventDefault();
    const recipient = $("new-chat-user").value.trim();
    if (recipient) model.pendingOpen = model.client.createChat(recipient);
  });
  $("new-group").addEventListener("click", () => openGroupDialog());
  $("group-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitGroup();
  });
  $("group-cancel").addEventListener("click", () => $("group-dialog").close());
  $("group-dialog").addEventListener("close", () => {
    model.pendingGroup = null; // a late reply adds the group to the list, but opens nothing
  });
  const memberInput = $("group-member-input");
  memberInput.addEventListener("input", () => chipsFromInput());
  memberInput.addEventListener("blur", () => chipsFromInput({ all: true }));
  memberInput.addEventListener("keydown", (event) => {
    if (event.isComposing) return;
    if (event.key === "Enter" && memberInput.value.trim()) {
      event.preventDefault(); // Enter makes a chip; with nothing typed it creates the group
      chipsFromInput({ all: true });
    } else if (event.key === "Backspace" && !memberInput.value) {
      $("group-chips").querySelector(".chip:last-of-type")?.remove();
    }
  });
  $("group-chips").addEventListener("click", (event) => {
    if (event.target === event.currentTarget) memberInput.focus();
  });
  $("members-button").addEventListener("click", () => openMembers());
  const chatMenu = $("chat-menu");
  $("chat-menu-button").addEventListener("click", (event) => {
    event.stopPropagation();
    if (chatMenu.hidden) openChatMenu();
    else closeChatMenu();
  });
  chatMenu.addEventListener("click", (event) => {
    const action = event.target.closest("[data-action]")?.dataset.action;
    if (action) chatMenuAction(action);
  });
  chatMenu.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      closeChatMenu();
      $("chat-menu-button").focus();
    }
  });
  $("unblock-button").addEventListener("click", () => {
    const peer = blockedPeer(model.client?.chat(model.openChatId));
    if (!peer) return;
    model.client.unblockUser(peer);
    model.focusAfterUnblock = true;
  });
  $("conversation-heading").addEventListener("click", () => openMembers());
  $("members-close").addEventListener("click", () => $("members-dialog").close());
  $("members-dialog").addEventListener("close", () => {
    model.membersFor = null;
  });
  $("add-members-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submitAddMembers();
  });
  $("leave-group").addEventListener("click", () => confirmLeave());
  const readersPopover = $("readers-popover");
  readersPopover.tabIndex = -1;
  readersPopover.addEventListener("keydown", (event) => {
    if (event.key === "Escape") closeReaders();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    submitComposer();
  });
  const input = $("message-input");
  input.addEventListener("keydown", (event) => {
    if (event.isComposing) return; // never interrupt an IME composition
    // Enter sends, Shift+Enter is a new line.
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      submitComposer();
    } else if (event.key === "Escape" && model.editing) {
      event.preventDefault();
      stopEditing();
    } else if (event.key === "ArrowUp" && !input.value && !model.editing && model.openChatId) {
      const message = lastEditableMessage();
      if (message) {
        event.preventDefault();
        startEditing(model.openChatId, message);
      }
    }
  });
  input.addEventListener("input", () => {
    composerChanged();
    noteTyping();
  });
  $("cancel-edit").addEventListener("click", () => {
    stopEditing();
    input.focus();
  });
  $("load-older").addEventListener("click", () => {
    if (model.openChatId) model.client.loadOlder(model.openChatId);
    render();
  });
  $("messages").addEventListener("scroll", () => {
    const chat = model.openChatId && model.client?.chat(model.openChatId);
    if (chat) updateJump(chat);
    if (model.readersFor) closeReaders();
  });
  $("jump").addEventListener("click", () => {
    const list = $("messages");
    list.scrollTo({ top: list.scrollHeight, behavior: "smooth" });
    $("jump").hidden = true;
  });
  const menu = $("message-menu");
  menu.addEventListener("click", (event) => {
    const action = event.target.closest("[data-action]")?.dataset.action;
    if (action) menuAction(action);
  });
  menu.addEventListener("keydown", (event) => {
    const items = [...menu.querySelectorAll("button")];
    const index = items.indexOf(document.activeElement);
    if (event.key === "Escape") {
      closeMenu();
      input.focus();
    } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      const step = event.key === "ArrowDown" ? 1 : -1;
      items[(index + step + items.length) % items.length].focus();
    }
  });
  document.addEventListener("click", (event) => {
    if (!menu.hidden && !menu.contains(event.target)) closeMenu();
    if (!chatMenu.hidden && !chatMenu.contains(event.target)) closeChatMenu();
    if (!readersPopover.hidden && !readersPopover.contains(event.target)) closeReaders();
  });
  window.addEventListener("resize", () => {
    closeMenu();
    closeChatMenu();
    closeReaders();
  });
  $("clear-log").addEventListener("click", () => {
    $("frame-list").replaceChildren();
    $("frame-log").dataset.count = "0";
    $("frame-count").textContent = "(0)";
  });
  document.addEventListener("visibilitychange", () => {
    updateViewing();
    render();
  });
  // Warn before leaving while something typed has not reached the server yet. It is kept in
  // localStorage and sent after the next load anyway, but only if the person comes back.
  window.addEventListener("beforeunload", (event) => {
    if (model.client && model.client.outbox.length > 0) {
      event.preventDefault();
      event.returnValue = "";
    }
  });
  setInterval(() => {
    if (model.client?.state === "waiting") setConnectionPill("waiting");
  }, 1000);
  setInterval(() => render(), CLOCK_TICK_MS); // "last seen …" and "Today" age with the clock

  const saved = sessionStorage.getItem(SESSION_KEY);
  if (saved) startSession(JSON.parse(saved));
}

setUp();
