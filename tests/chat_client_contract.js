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
  return out;
};
