// The outbox contract of web/chat-client.js, run in the page by tests/test_web_client.py.
// A scripted stand-in for the server is injected through ChatClient's `WebSocket` option, to pin
// down exactly what is sent when, and what a resend carries. Evaluates to an async function
// whose result the Python test asserts on.
async () => {
  const { ChatClient } = await import("/chat-client.js");

  class FakeSocket extends EventTarget {
    static OPEN = 1;
    static all = [];

    constructor(url) {
      super();
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      FakeSocket.all.push(this);
    }

    send(text) {
      this.sent.push(JSON.parse(text));
    }

    open() {
      this.readyState = 1;
      this.dispatchEvent(new Event("open"));
    }

    receive(frame) {
      this.dispatchEvent(new MessageEvent("message", { data: JSON.stringify(frame) }));
    }

    close(code = 1000) {
      this.readyState = 3;
      this.dispatchEvent(new CloseEvent("close", { code }));
    }
  }

  const tick = (ms = 30) => new Promise((resolve) => setTimeout(resolve, ms));
  const latest = () => FakeSocket.all.at(-1);
  const sends = (socket) => socket.sent.filter((frame) => frame.type === "send_message");
  const bind = () => latest().receive({ type: "authenticated", user_id: "alice" });
  const out = {};

  const client = new ChatClient({
    url: "/ws",
    token: "t0",
    WebSocket: FakeSocket,
    backoffBaseMs: 1,
    backoffMaxMs: 2,
  });
  const states = [];
  client.addEventListener("outbox", ({ detail: { entry } }) => {
    states.push(`${entry.frame.content}:${entry.state}`);
  });
  client.start();

  // Typed before the connection is bound: waits, then goes out once bound.
  const offline = client.sendMessage({ chatId: "c", recipientId: "bob", content: "typed offline" });
  const cmid = offline.clientMessageId;
  latest().open();
  out.sentBeforeBind = latest().sent.length;
  bind();
  out.firstSocketSends = sends(latest()).map((frame) => frame.client_message_id === cmid);
  out.url = latest().url;

  // Dropped before the acknowledgement: resent on the next bind, with the same id.
  latest().close(1006);
  await tick();
  latest().open();
  bind();
  const resent = sends(latest());
  out.resentSameId = resent.length === 1 && resent[0].client_message_id === cmid;
  latest().receive({
    type: "message",
    message_id: "m1",
    chat_id: "c",
    sender_id: "alice",
    recipient_id: "bob",
    content: "typed offline",
    timestamp: "2024-01-01T00:00:00.000Z",
    client_message_id: cmid,
    request_id: resent[0].request_id,
  });
  out.afterAck = client.outbox.length;

  // A refusal for good fails the send; rate limiting only delays it.
  const tooBig = client.sendMessage({ chatId: "c", recipientId: "bob", content: "too big" });
  latest().receive({
    type: "error",
    code: "too_large",
    message: "m",
    request_id: tooBig.requestId,
  });
  out.tooBig = [tooBig.state, tooBig.error.code, client.outbox.length];

  const limited = client.sendMessage({ chatId: "c", recipientId: "bob", content: "limited" });
  latest().receive({
    type: "error",
    code: "rate_limited",
    message: "m",
    retry_after_ms: 10,
    request_id: limited.requestId,
  });
  out.limitedState = limited.state;
  await tick();
  out.limitedResent = sends(latest()).filter((frame) => frame.content === "limited").length;
  out.states = states;
  client.stop();

  // A refused token without a way to get another: stop and say so, no reconnect loop.
  const refused = new ChatClient({ url: "/ws", token: "bad", WebSocket: FakeSocket });
  let failed = null;
  refused.addEventListener("auth-failed", (event) => {
    failed = event.detail.message;
  });
  refused.start();
  latest().open();
  latest().receive({ type: "error", code: "unauthorized", message: "invalid token" });
  await tick();
  out.refused = [failed, refused.state];
  out.model = await modelContract();
  return out;

  // The chat model (messages by seq, marks, unread counts, ticks) is fed by server frames only;
  // the client counts unread messages itself only when it holds every one after the read mark.
  async function modelContract() {
    const m = {};
    const saved = new Map();
    const storage = {
      getItem: (key) => saved.get(key) ?? null,
      setItem: (key, value) => saved.set(key, String(value)),
      removeItem: (key) => saved.delete(key),
    };
    const options = {
      url: "/ws",
      token: "t1",
      WebSocket: FakeSocket,
      backoffBaseMs: 1,
      backoffMaxMs: 2,
      storage,
      storageKey: "outbox.alice",
      pageSize: 2,
    };
    const sent = (type) => latest().sent.filter((frame) => frame.type === type);
    const msg = (seq, sender = "bob", extra = {}) => ({
      message_id: `m${seq}`,
      chat_id: "c",
      sender_id: sender,
      recipient_id: sender === "bob" ? "alice" : "bob",
      content: `text ${seq}`,
      timestamp: `2024-01-01T00:00:${String(seq).padStart(2, "0")}.000Z`,
      seq,
      ...extra,
    });
    const chatObject = (overrides = {}) => ({
      chat_id: "c",
      kind: "direct",
      title: null,
      participants: ["alice", "bob"],
      created_by: "alice",
      created_at: "2024-01-01T00:00:00.000Z",
      last_message: msg(3),
      unread_count: 3,
      read_up_to: { alice: 0, bob: 3 },
      delivered_up_to: { alice: 3, bob: 3 },
      ...overrides,
    });
    const receipt = (user, kind, seq, requestId) => ({
      type: "receipt",
      chat_id: "c",
      user_id: user,
      kind,
      seq,
      message_id: `m${seq}`,
      timestamp: "2024-01-01T00:01:00.000Z",
      ...(requestId ? { request_id: requestId } : {}),
    });
    const unread = () => client.chat("c").unread;

    const client = new ChatClient(options);
    client.start();
    latest().open();
    bind();
    m.syncOnBind = sent("fetch_chats").map((frame) => frame.limit);
    latest().receive({
      type: "all_chats",
      data: [chatObject()],
      request_id: sent("fetch_chats")[0].request_id,
    });
    m.fromChatObject = unread();
    latest().receive({ type: "message", ...msg(4) });
    m.liveFromOther = unread();
    // Read up to 1 on another device; seq 2 is not held, so only the server can count.
    latest().receive(receipt("alice", "read", 1));
    m.askedAgain = sent("fetch_chats").map((frame) => frame.limit);
    m.unreadWhileAsking = unread();
    latest().receive({
      type: "all_chats",
      data: [chatObject({ last_message: msg(4), read_up_to: { alice: 1, bob: 4 } })],
      request_id: sent("fetch_chats")[1].request_id,
    });
    m.afterAnswer = unread();

    client.openChat("c");
    const newest = sent("fetch_messages").at(-1);
    m.openFetch = [newest.chat_id, newest.limit, "before" in newest];
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(3), msg(4)],
      has_more: true,
      request_id: newest.request_id,
    });
    m.hasOlder = client.hasOlder("c");
    client.loadOlder("c");
    const older = sent("fetch_messages").at(-1);
    m.olderBefore = older.before;
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(1, "alice"), msg(2)],
      has_more: false,
      request_id: older.request_id,
    });
    m.held = client.messages("c").map((message) => message.seq);
    m.hasOlderAfter = client.hasOlder("c");
    m.countedHeld = unread();

    // On screen: the newest is marked read; one mark_read in flight per chat.
    client.setViewing("c");
    const firstMark = sent("mark_read").at(-1);
    m.markOnView = [firstMark.chat_id, firstMark.message_id, unread()];
    latest().receive({ type: "message", ...msg(5) });
    m.viewedLive = [unread(), sent("mark_read").length];
    latest().receive(receipt("alice", "read", 4, firstMark.request_id));
    const secondMark = sent("mark_read").at(-1);
    m.secondMark = secondMark.message_id;
    latest().receive(receipt("alice", "read", 5, secondMark.request_id));
    m.afterReceipts = unread();

    client.setViewing(null);
    latest().receive({ type: "message", ...msg(6) });
    latest().receive({ type: "message", ...msg(7) });
    m.twoNew = unread();
    latest().receive({ type: "message_updated", ...msg(7, "bob", { content: "", deleted: true }) });
    m.afterDelete = [unread(), client.chat("c").lastMessage.deleted === true];
    latest().receive({ type: "message", ...msg(8, "alice") }); // sent from another device
    m.afterOwn = [unread(), client.chat("c").readUpTo.alice];

    const own = msg(8, "alice");
    m.ticks = [client.status("c", own)];
    latest().receive(receipt("bob", "delivered", 8));
    m.ticks.push(client.status("c", own));
    latest().receive(receipt("bob", "read", 8));
    m.ticks.push(client.status("c", own));

    const edit = client.editMessage({ chatId: "c", messageId: "m8", content: "fixed" });
    const editFrame = sent("edit_message").at(-1);
    m.editSent = [editFrame.message_id, editFrame.content, client.outbox.length];
    m.heldBeforeAck = client.messages("c").at(-1).content; // the server's state until it answers
    latest().receive({
      type: "message_updated",
      ...msg(8, "alice", { content: "fixed", edited_at: "2024-01-01T00:02:00.000Z" }),
      request_id: editFrame.request_id,
    });
    m.editDone = [edit.state, client.outbox.length, client.messages("c").at(-1).content];

    // Back after an absence: the chat object says seq 12 is the newest, so 9..11 went to
    // another device. What is held no longer reaches the newest: the open chat is fetched again.
    client.setViewing("c");
    latest().close(1006);
    await tick();
    latest().open();
    bind();
    m.resync = sent("fetch_chats").map((frame) => frame.limit);
    latest().receive({
      type: "all_chats",
      data: [
        chatObject({
          last_message: msg(12),
          unread_count: 4,
          read_up_to: { alice: 8, bob: 8 },
          delivered_up_to: { alice: 12, bob: 8 },
        }),
      ],
      request_id: sent("fetch_chats")[0].request_id,
    });
    const refetch = sent("fetch_messages");
    m.gapFetch = refetch.map((frame) => [frame.limit, "before" in frame]);
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(11), msg(12)],
      has_more: true,
      request_id: refetch[0].request_id,
    });
    m.afterGap = [client.messages("c").map((message) => message.seq), client.hasOlder("c")];
    m.gapMark = sent("mark_read").map((frame) => frame.message_id);

    // Back once more, no gap this time: the newest page is fetched again, and the older
    // messages still held are fetched again too (they may have changed on another device).
    client.loadOlder("c");
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(9), msg(10)],
      has_more: true,
      request_id: sent("fetch_messages").at(-1).request_id,
    });
    latest().close(1006);
    await tick();
    latest().open();
    bind();
    latest().receive({
      type: "all_chats",
      data: [
        chatObject({ last_message: msg(12), unread_count: 0, read_up_to: { alice: 12, bob: 8 } }),
      ],
      request_id: sent("fetch_chats")[0].request_id,
    });
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(11), msg(12)],
      has_more: true,
      request_id: sent("fetch_messages")[0].request_id,
    });
    const again = sent("fetch_messages");
    m.refresh = again.map((frame) => [frame.before ?? null, frame.limit]);
    latest().receive({
      type: "all_messages",
      chat_id: "c",
      data: [msg(9, "bob", { content: "", deleted: true }), msg(10)],
      has_more: true,
      request_id: again[1].request_id,
    });
    m.refreshed = client.messages("c").map((message) => [message.seq, message.deleted === true]);

    // The outbox outlives the page: sends and refusals are in storage, and a new client (the
    // reloaded page) resends the pending one with the same client_message_id.
    const refused = client.sendMessage({ chatId: "c", recipientId: "bob", content: "refused" });
    latest().receive({
      type: "error",
      code: "too_large",
      message: "m",
      request_id: refused.requestId,
    });
    client.stop();
    const pending = client.sendMessage({ chatId: "c", recipientId: "bob", content: "reload" });
    const reloaded = new ChatClient(options);
    m.restored = [
      reloaded.outbox.map((entry) => [entry.clientMessageId, entry.state]),
      reloaded.failed.map((entry) => [entry.frame.content, entry.error.code]),
    ];
    m.expected = [[[pending.clientMessageId, "queued"]], [["refused", "too_large"]]];
    reloaded.start();
    latest().open();
    bind();
    const resent = sends(latest());
    m.restoredResent = resent.map((frame) => frame.client_message_id === pending.clientMessageId);
    latest().receive({
      type: "message",
      ...msg(13, "alice"),
      client_message_id: pending.clientMessageId,
    });
    reloaded.discard(refused.clientMessageId);
    m.storageAfter = JSON.parse(saved.get("outbox.alice")).entries;
    reloaded.stop();
    return m;
  }
};
