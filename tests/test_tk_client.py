"""The Tkinter test client: its pure helpers, its Trio connection against a real handler, and the
window itself under Xvfb."""

from __future__ import annotations

import json
import tkinter as tk
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from clients_support import (
    HandlerProcess,
    Xvfb,
    ensure_debian_packages,
    load_test_client,
    save_screenshot,
)

from handler import protocol
from handler.config import Config, parse_config
from handler.server import serve

tc = load_test_client()

# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("target", "http", "ws"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000", "ws://127.0.0.1:9000/ws"),
        ("[::]:9000", "http://[::1]:9000", "ws://[::1]:9000/ws"),
        ("https://chat.example:443", "https://chat.example:443", "wss://chat.example:443/ws"),
        ("ws://localhost:8080/ws", "http://localhost:8080", "ws://localhost:8080/ws"),
        ("wss://chat.example/gateway", "https://chat.example", "wss://chat.example/gateway"),
        ("http://localhost:8080/", "http://localhost:8080", "ws://localhost:8080/ws"),
    ],
)
def test_resolve_endpoints_from_target(target: str, http: str, ws: str) -> None:
    assert tc.resolve_endpoints(target) == tc.Endpoints(http=http, ws=ws)


def test_resolve_endpoints_from_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"handler_url": "0.0.0.0:8123"}))
    assert tc.resolve_endpoints(None, config).ws == "ws://127.0.0.1:8123/ws"
    # Without a config the client still starts, on the handler's default address.
    assert tc.resolve_endpoints(None, tmp_path / "missing.json").ws == "ws://127.0.0.1:8080/ws"


@pytest.mark.parametrize("target", ["ftp://host:21", "http://", "::::"])
def test_resolve_endpoints_rejects_nonsense(target: str) -> None:
    with pytest.raises(ValueError, match="not a handler address"):
        tc.resolve_endpoints(target)


def test_with_token_encodes_the_query() -> None:
    assert tc.with_token("ws://h:1/ws", "") == "ws://h:1/ws"
    assert tc.with_token("ws://h:1/ws", "a.b+c") == "ws://h:1/ws?token=a.b%2Bc"
    assert tc.with_token("ws://h:1/ws?x=1", "t") == "ws://h:1/ws?x=1&token=t"


def test_backoff_grows_is_capped_and_keeps_a_floor() -> None:
    assert tc.backoff_delay(0, rand=lambda: 0.0) == pytest.approx(0.25)
    assert tc.backoff_delay(0, rand=lambda: 1.0) == pytest.approx(0.5)
    assert tc.backoff_delay(3, rand=lambda: 0.0) == pytest.approx(2.0)
    assert tc.backoff_delay(30, rand=lambda: 1.0) == pytest.approx(tc.BACKOFF_MAX_S)
    assert tc.backoff_delay(30, rand=lambda: 0.0) == pytest.approx(tc.BACKOFF_MAX_S / 2)


def test_templates_cover_every_client_frame_and_pass_the_servers_decoder() -> None:
    assert sorted(tc.TEMPLATE_TYPES) == sorted(protocol.CLIENT_FRAME_TYPES)
    context = tc.Context(user_id="alice", chat_id="c1", peer="bob")
    for frame_type in tc.TEMPLATE_TYPES:
        frame = tc.frame_template(frame_type, context)
        decoded = protocol.decode(json.dumps(frame))
        assert decoded.type == frame_type


def test_send_message_template_uses_the_context_and_a_fresh_client_message_id() -> None:
    context = tc.Context(user_id="alice", chat_id="c9", peer="bob")
    first = tc.frame_template("send_message", context)
    second = tc.frame_template("send_message", context)
    assert (first["chat_id"], first["recipient_id"]) == ("c9", "bob")
    assert first["client_message_id"] != second["client_message_id"]


def chat(chat_id: str, *users: str) -> dict[str, Any]:
    return {"chat_id": chat_id, "participants": sorted(users), "created_by": users[0]}


def message(chat_id: str, sender: str, recipient: str) -> dict[str, Any]:
    return {"chat_id": chat_id, "sender_id": sender, "recipient_id": recipient, "content": "x"}


def test_context_follows_the_conversation() -> None:
    context = tc.Context()
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    context.observe_sent({"type": "create_chat", "recipient_id": "carol"})
    assert (context.user_id, context.peer) == ("alice", "carol")
    context.observe_received({"type": "new_chats", "data": [chat("c1", "alice", "bob")]})
    assert (context.chat_id, context.peer) == ("c1", "bob")
    context.observe_received({"type": "message", **message("c2", "dave", "alice")})
    assert (context.chat_id, context.peer) == ("c2", "dave")
    context.observe_received({"type": "message", **message("c3", "alice", "erin")})
    assert (context.chat_id, context.peer) == ("c3", "erin")
    context.observe_received(
        {"type": "new_messages", "chat_id": "c4", "data": [message("c4", "frank", "alice")]}
    )
    assert (context.chat_id, context.peer) == ("c4", "frank")
    # all_chats lists the most recently active chat first.
    all_chats = [chat("c5", "alice", "gina"), chat("c1", "alice", "bob")]
    context.observe_received({"type": "all_chats", "data": all_chats})
    assert (context.chat_id, context.peer) == ("c5", "gina")


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "new_chats", "data": []},
        {"type": "new_chats", "data": ["junk"]},
        {"type": "all_chats", "data": "junk"},
        {"type": "new_messages", "data": [None]},
        {"type": "message", "chat_id": 7},
        {"type": "authenticated", "user_id": None},
        {"type": "something_new"},
    ],
)
def test_context_ignores_frames_it_cannot_use(frame: dict[str, Any]) -> None:
    context = tc.Context(user_id="alice", chat_id="c1", peer="bob")
    context.observe_received(frame)
    assert (context.user_id, context.chat_id, context.peer) == ("alice", "c1", "bob")


def test_check_frame_reports_what_the_server_would() -> None:
    assert tc.check_frame('{"type": "ping"}') is None
    assert tc.check_frame("{nope") == "bad_json: the frame is not valid JSON"
    problem = tc.check_frame('{"type": "send_message", "chat_id": "c", "recipient_id": "b"}')
    assert problem is not None
    assert problem.startswith("bad_request (content):")


def test_pretty_indents_json_and_shortens_tokens() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9." + "x" * 40
    text = json.dumps({"type": "ping", "token": token, "nested": [{"token": "short"}]})
    shown = tc.pretty(text)
    assert '\n  "type": "ping"' in shown
    assert token not in shown
    assert f"eyJhbGciOiJI… ({len(token)} chars)" in shown
    assert '"token": "short"' in shown
    assert tc.pretty("not json") == "not json"


def test_log_entry_headers() -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, 678_000)
    out = tc.LogEntry(at, "out", '{"type": "ping"}')
    assert out.header() == "03:04:05.678  → out  ping"
    error = tc.LogEntry(at, "in", '{"type": "error", "code": "not_found", "message": "m"}')
    assert error.header() == "03:04:05.678  ← in   error not_found"
    note = tc.LogEntry(at, "note", "hello")
    assert (note.header(), note.body(), note.frame) == ("03:04:05.678  • note", "hello", None)
    assert tc.LogEntry(at, "in", "[1, 2]").frame is None


def test_history_browses_like_a_shell() -> None:
    history = tc.SentHistory(limit=3)
    assert history.older("draft") is None
    for text in ("a", "b", "b", "c"):
        history.add(text)
    assert len(history) == 3  # the repeated "b" is kept once
    assert history.newer() is None
    assert history.older("draft") == "c"
    assert history.older("c") == "b"
    assert history.older("b") == "a"
    assert history.older("a") is None
    assert history.newer() == "b"
    assert history.newer() == "c"
    assert history.newer() == "draft"
    assert history.newer() is None
    history.add("d")
    assert history.older("") == "d"
    assert history.older("d") == "c"  # "a" fell off: the history is bounded


# ----------------------------------------------------------------------------- Trio, real server


def server_config(tmp_path: Path, *, dev_tokens: bool = True) -> Config:
    return parse_config(
        {
            "handler_url": "127.0.0.1:0",
            "storage": {"path": str(tmp_path / "chat.db")},
            "auth": {"jwt_secret": "tk-client-tests-secret-0123456789", "dev_tokens": dev_tokens},
        },
        base_dir=tmp_path,
    )


@pytest.fixture
async def server_url(tmp_path: Path) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, server_config(tmp_path))
        yield urls[0]
        nursery.cancel_scope.cancel()


class Recorder:
    """A `LinkListener` that keeps what it is told and lets a test wait for it."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.entries: list[tc.LogEntry] = []
        self._changed = trio.Event()

    def link_state(self, state: str, detail: str) -> None:
        self.states.append(state)
        self._wake()

    def link_entry(self, entry: tc.LogEntry) -> None:
        self.entries.append(entry)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def received(self, frame_type: str) -> list[dict[str, Any]]:
        return [
            entry.frame
            for entry in self.entries
            if entry.direction == "in" and entry.frame and entry.frame.get("type") == frame_type
        ]

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        with trio.fail_after(10):
            while not predicate():
                await self._changed.wait()


async def test_fetch_dev_token_from_a_real_server(server_url: str) -> None:
    token = await tc.fetch_dev_token(server_url, "alice")
    assert token.count(".") == 2
    with pytest.raises(RuntimeError, match=r"user_id must be 1\.\.128 characters"):
        await tc.fetch_dev_token(server_url, "")


async def test_fetch_dev_token_says_when_the_server_has_none(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, server_config(tmp_path, dev_tokens=False))
        with pytest.raises(RuntimeError, match="does not hand out dev tokens"):
            await tc.fetch_dev_token(urls[0], "alice")
        nursery.cancel_scope.cancel()


async def test_link_binds_sends_and_receives(server_url: str) -> None:
    token = await tc.fetch_dev_token(server_url, "alice")
    ws_url = tc.with_token(tc.resolve_endpoints(server_url).ws, token)
    recorder = Recorder()
    link = tc.Link(recorder, ping_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run, ws_url)
        await recorder.wait_for(lambda: recorder.received("authenticated"))
        assert link.send(json.dumps({"type": "create_chat", "recipient_id": "bob"}))
        await recorder.wait_for(lambda: recorder.received("new_chats"))
        # The automatic pings go through the same writer as the person's frames.
        await recorder.wait_for(lambda: recorder.received("pong"))
        # Text that cannot be UTF-8 is refused here instead of breaking the writer; the same
        # surrogate as a JSON escape is sent as typed, and the server answers bad_request.
        assert not link.send('{"type": "create_chat", "recipient_id": "\ud800"}')
        assert "lone surrogate" in recorder.entries[-1].text
        assert link.send('{"type": "create_chat", "recipient_id": "\\ud800"}')
        await recorder.wait_for(lambda: recorder.received("error"))
        nursery.cancel_scope.cancel()
    assert recorder.received("error")[0]["code"] == "bad_request"
    assert recorder.received("authenticated")[0]["user_id"] == "alice"
    assert recorder.received("new_chats")[0]["data"][0]["participants"] == ["alice", "bob"]
    assert recorder.states[:2] == ["connecting", "connected"]
    assert recorder.states[-1] == "disconnected"


async def test_link_refuses_to_send_while_disconnected() -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    assert not link.send('{"type": "ping"}')
    assert recorder.entries[-1].text == "not connected: the frame was not sent"


async def test_link_reconnects_after_a_refused_connection(autojump_clock: trio.abc.Clock) -> None:
    # Port 1 on loopback refuses at once; the link backs off and tries again.
    recorder = Recorder()
    link = tc.Link(recorder)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run, "ws://127.0.0.1:1/ws")
        await recorder.wait_for(lambda: recorder.states.count("connecting") >= 3)
        nursery.cancel_scope.cancel()
    assert recorder.states[:3] == ["connecting", "waiting", "connecting"]
    assert "cannot connect" in recorder.entries[0].text


async def test_link_without_auto_reconnect_stops_after_one_try() -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    link.auto_reconnect = False
    with trio.fail_after(10):
        await link.run("ws://127.0.0.1:1/ws")
    assert recorder.states == ["connecting", "disconnected"]


# ----------------------------------------------------------------------------- the window


WINDOW = (1040, 760)


@pytest.fixture(scope="session")
def xvfb() -> Iterator[Xvfb]:
    reason = ensure_debian_packages("Xvfb", "xvfb", "xauth")
    if reason is not None:
        pytest.skip(reason)
    display = Xvfb(*WINDOW)
    display.start()
    yield display
    display.stop()


@pytest.fixture
def handler_process(tmp_path: Path) -> Iterator[HandlerProcess]:
    server = HandlerProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.gui
def test_window_connects_sends_and_shows_the_reply(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    root = tk.Tk(screenName=xvfb.display)
    root.geometry(f"{WINDOW[0]}x{WINDOW[1]}+0+0")
    app = tc.App(root, tc.resolve_endpoints(handler_process.url), user="alice")
    steps: list[str] = []

    async def wait_until(predicate: Callable[[], object]) -> None:
        # The window has no events to wait on: look at it, as a person would, until it shows.
        with trio.fail_after(10):
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.01)

    def received(frame_type: str) -> list[dict[str, Any]]:
        return [
            entry.frame
            for entry in app.entries
            if entry.direction == "in" and entry.frame and entry.frame.get("type") == frame_type
        ]

    async def person(app: tc.App) -> None:
        # What a person does: get a token, connect, start a chat from the template, say hello.
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: received("authenticated"))
        steps.append("connected")
        assert "connected" in app.state_label.cget("text")
        app.editor.delete("1.0", "end")
        app.editor.insert("1.0", '{"type": "create_chat", "recipient_id": "bob"}')
        app.send_button.invoke()
        await wait_until(lambda: received("new_chats"))
        steps.append("chat created")
        app.template_buttons["send_message"].invoke()
        template = json.loads(app.editor.get("1.0", "end"))
        assert template["chat_id"] == received("new_chats")[0]["data"][0]["chat_id"]
        assert template["recipient_id"] == "bob"
        app.editor.focus_force()
        app.editor.event_generate("<Control-Return>", when="tail")  # the keyboard shortcut
        await wait_until(lambda: received("message"))
        steps.append("message acknowledged")
        assert received("message")[0]["client_message_id"] == template["client_message_id"]
        app.editor.delete("1.0", "end")
        app.editor.insert("1.0", '{"type": "fetch_messages", "chat_id": "no-such-chat"}')
        app.send_button.invoke()
        await wait_until(lambda: received("error"))
        steps.append("error shown")
        shown = app.log.get("1.0", "end")
        assert "→ out  send_message" in shown
        assert "← in   message" in shown
        assert "error not_found" in shown
        app.history_older()
        assert "fetch_messages" in app.editor.get("1.0", "end")
        app.root.event_generate("<Motion>", warp=True, x=WINDOW[0] - 1, y=WINDOW[1] - 1)
        await trio.sleep(0.2)  # let Tk paint before the screenshot
        save_screenshot(xvfb.screenshot(), "screenshot-tk.png", docs=True)
        app.close()

    app.start(person)
    root.mainloop()
    assert app.trio_outcome is not None
    app.trio_outcome.unwrap()
    assert steps == ["connected", "chat created", "message acknowledged", "error shown"]
