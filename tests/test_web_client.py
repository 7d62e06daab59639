"""The browser client in a real Chromium, against a real handler process.

Playwright's sync API runs its own event loop, so these are plain (non-async) tests and the
handler runs as a subprocess, which also lets one test kill and restart it on the same port.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from clients_support import HandlerProcess, ensure_debian_packages, save_screenshot

sync_api = pytest.importorskip("playwright.sync_api")
Browser = sync_api.Browser
Page = sync_api.Page
WebSocketRoute = sync_api.WebSocketRoute
expect = sync_api.expect

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 780}
RECONNECT_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reason = ensure_debian_packages(CHROMIUM, "chromium")
    if reason is not None:
        pytest.skip(reason)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandlerProcess]:
    handler = HandlerProcess(tmp_path_factory.mktemp("handler"))
    handler.start()
    yield handler
    handler.stop()


@pytest.fixture
def open_page(browser: Browser, server: HandlerProcess) -> Iterator[Callable[..., Page]]:
    """Open the client in a fresh browser profile; fail the test on any uncaught JS error."""
    page_errors: list[str] = []
    contexts = []

    def open_page(
        viewport: dict[str, int] = DESKTOP, route: Callable[[WebSocketRoute], None] | None = None
    ) -> Page:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        if route is not None:
            page.route_web_socket(re.compile(r"/ws"), route)
        page.goto(server.url)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert page_errors == []


def sign_in(page: Page, user: str) -> Page:
    page.get_by_label("User id", exact=True).fill(user)
    page.get_by_role("button", name="Sign in with a dev token").click()
    expect(page.locator("#connection")).to_have_text("Online")
    expect(page.locator("#whoami")).to_have_text(user)
    return page


def start_chat(page: Page, user: str) -> None:
    page.get_by_label("Start a chat with user id").fill(user)
    page.get_by_role("button", name="New chat").click()


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def bubbles(page: Page) -> Any:
    return page.locator("#message-list .bubble .content")


def logged(page: Page, direction: str, frame_type: str) -> Any:
    return page.locator(f'#frame-list li[data-direction="{direction}"][data-type="{frame_type}"]')


def test_two_users_create_a_chat_and_talk_both_ways(open_page: Callable[..., Page]) -> None:
    alice = sign_in(open_page(), "alice")
    bob = sign_in(open_page(), "bob")

    start_chat(alice, "bob")
    expect(alice.locator("#conversation-title")).to_have_text("bob")
    send(alice, "Hi Bob, lunch at noon?")
    mine = alice.locator(".bubble.own")
    expect(mine).to_have_attribute("data-state", "sent")  # the server acknowledged it
    expect(mine.locator(".delivery")).to_have_text("✓ Sent")

    chat_with_alice = bob.locator(".chat-item", has_text="alice")
    expect(chat_with_alice.locator(".badge")).to_have_text("1")
    chat_with_alice.click()
    expect(bubbles(bob)).to_have_text(["Hi Bob, lunch at noon?"])
    expect(bob.locator(".bubble.theirs .sender")).to_have_text("alice")
    expect(chat_with_alice.locator(".badge")).to_have_count(0)

    # Shift+Enter is a new line, Enter sends.
    box = bob.get_by_label("Message", exact=True)
    box.fill("Sure!")
    box.press("Shift+Enter")
    box.press_sequentially("Grüße from the second line.")
    box.press("Enter")
    expect(bubbles(alice)).to_have_text(
        ["Hi Bob, lunch at noon?", "Sure!\nGrüße from the second line."]
    )
    expect(bob.locator(".bubble.own")).to_have_attribute("data-state", "sent")

    # The list is ordered by last activity: a newer chat goes on top, a reply brings bob back.
    start_chat(alice, "carol")
    expect(alice.locator("#conversation-title")).to_have_text("carol")
    send(alice, "Carol, are you coming too?")
    expect(alice.locator(".chat-item .chat-name")).to_have_text(["carol", "bob"])
    alice.locator(".chat-item", has_text="bob").click()
    send(bob, "Table for three, then.")
    expect(alice.locator(".chat-item .chat-name")).to_have_text(["bob", "carol"])

    # The raw frame log shows the frames both ways, pretty-printed.
    alice.locator("#frame-log summary").click()
    expect(logged(alice, "out", "create_chat")).to_have_count(2)
    expect(logged(alice, "out", "send_message")).to_have_count(2)
    expect(logged(alice, "in", "message").first).to_contain_text('"sender_id": "alice"')
    alice.get_by_label("Message", exact=True).fill("See you both there")
    save_screenshot(alice.screenshot(), "screenshot-web.png", docs=True)


def test_offline_user_sees_the_backlog_after_signing_in(open_page: Callable[..., Page]) -> None:
    dave = sign_in(open_page(), "dave")
    start_chat(dave, "erin")
    for text in ("First, while you were away", "Second, still away"):
        send(dave, text)
    expect(dave.locator('.bubble.own[data-state="sent"]')).to_have_count(2)

    erin = sign_in(open_page(PHONE), "erin")
    chat_with_dave = erin.locator(".chat-item", has_text="dave")
    expect(chat_with_dave.locator(".badge")).to_have_text("2")
    expect(logged(erin, "in", "new_chats")).to_have_count(1)
    expect(logged(erin, "in", "new_messages")).to_have_count(1)
    chat_with_dave.click()
    expect(bubbles(erin)).to_have_text(["First, while you were away", "Second, still away"])
    expect(erin.locator(".chat-list")).to_be_hidden()  # phone width: one pane at a time
    save_screenshot(erin.screenshot(), "screenshot-web-phone.png")
    erin.get_by_role("button", name="Back to chats").click()
    expect(chat_with_dave).to_be_visible()
    expect(chat_with_dave.locator(".badge")).to_have_count(0)


def test_server_restart_loses_nothing_and_duplicates_nothing(
    open_page: Callable[..., Page], server: HandlerProcess
) -> None:
    # Frank's page drops his acknowledgements on request, so one message is stored by the
    # server but still pending in his browser when the server dies: the reconnect resends it.
    drop_acks = {"on": False}

    def route(ws: WebSocketRoute) -> None:
        upstream = ws.connect_to_server()

        def from_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if drop_acks["on"] and frame.get("type") == "message" and frame["sender_id"] == "frank":
                return
            ws.send(message)

        upstream.on_message(from_server)

    frank = sign_in(open_page(route=route), "frank")
    grace = sign_in(open_page(), "grace")
    start_chat(frank, "grace")
    send(frank, "one: before the restart")
    grace.locator(".chat-item", has_text="frank").click()
    send(grace, "two: reply before the restart")
    expect(bubbles(frank)).to_have_count(2)

    drop_acks["on"] = True
    send(frank, "three: stored, but the ack is lost")
    expect(bubbles(grace)).to_have_count(3)
    expect(frank.locator(".bubble.own").last).to_have_attribute("data-state", "sending")

    server.kill()
    for page in (frank, grace):
        expect(page.locator("#connection")).to_have_attribute("data-state", "waiting")
    drop_acks["on"] = False
    send(frank, "four: typed while offline")
    send(grace, "five: typed while offline too")
    expect(frank.locator(".bubble.own").last).to_have_attribute("data-state", "queued")
    expect(frank.locator(".bubble.own").last.locator(".delivery")).to_have_text(
        "Waiting for connection"
    )

    server.start()
    expected = [
        "one: before the restart",
        "two: reply before the restart",
        "three: stored, but the ack is lost",
        "four: typed while offline",
        "five: typed while offline too",
    ]
    for page in (frank, grace):
        expect(page.locator("#connection")).to_have_text("Online", timeout=RECONNECT_TIMEOUT_MS)
        expect(page.locator('.bubble.own:not([data-state="sent"])')).to_have_count(0)
    for page in (frank, grace):
        # Same set on both sides; the two offline messages may be stored in either order.
        expect(bubbles(page)).to_have_count(5)
        assert sorted(bubbles(page).all_inner_texts()) == sorted(expected)
    # A fresh load reads everything back from the server: still each message exactly once.
    for page in (frank, grace):
        page.reload()
        expect(page.locator("#connection")).to_have_text("Online")
        page.locator(".chat-item").first.click()
        expect(bubbles(page)).to_have_count(5)
        assert sorted(bubbles(page).all_inner_texts()) == sorted(expected)


def test_error_frames_are_shown_to_the_person(
    open_page: Callable[..., Page], server: HandlerProcess, tmp_path: Path
) -> None:
    heidi = sign_in(open_page(), "heidi")
    start_chat(heidi, "heidi")
    toast = heidi.locator('.toast[data-code="bad_request"]')
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("yourself")
    expect(toast).to_contain_text("recipient_id")
    expect(logged(heidi, "in", "error")).to_have_count(1)
    toast.get_by_role("button", name="Dismiss").click()
    expect(toast).to_have_count(0)

    # A token the server does not accept: the person is told, and is back at the sign-in form.
    mallory = open_page()
    forged = jwt.encode({"sub": "mallory"}, "not-the-servers-secret-0123456789", "HS256")
    mallory.get_by_label("JWT").fill(forged)
    mallory.get_by_role("button", name="Sign in with this token").click()
    expect(mallory.locator("#sign-in-error")).not_to_be_empty()
    expect(mallory.get_by_role("button", name="Sign in with a dev token")).to_be_visible()
    expect(logged(mallory, "in", "error")).to_have_count(1)


def test_keepalive_ping_and_in_band_token_refresh(open_page: Callable[..., Page]) -> None:
    page = open_page()
    page.clock.install()  # fake timers: a day of keep-alive passes in a moment
    ivan = sign_in(page, "ivan")
    ivan.locator("#frame-log summary").click()
    ivan.clock.run_for(25_000)
    expect(logged(ivan, "out", "ping")).to_have_count(1)
    expect(logged(ivan, "in", "pong")).to_have_count(1)
    # A minute before expiry the client fetches a new token and sends it in a ping, which
    # extends the connection's session without reconnecting.
    session = json.loads(ivan.evaluate("sessionStorage.getItem('chat.session')"))
    claims = jwt.decode(session["token"], options={"verify_signature": False})
    ivan.clock.fast_forward((claims["exp"] - claims["iat"] - 30) * 1000)
    refresh = logged(ivan, "out", "ping").filter(has_text='"token"')
    expect(refresh).to_have_count(1)
    expect(refresh).to_contain_text("chars)")  # the log shows a token's start only
    # The server took the new token: every ping is answered and nothing was refused.
    expect(logged(ivan, "in", "pong")).to_have_count(logged(ivan, "out", "ping").count())
    expect(logged(ivan, "in", "error")).to_have_count(0)
    expect(ivan.locator("#connection")).to_have_text("Online")


def test_chat_client_module_stands_alone(open_page: Callable[..., Page]) -> None:
    claims = {"sub": "zoë", "exp": 1, "note": "??>>"}  # UTF-8 and base64url's "-" and "_"
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert "-" in payload or "_" in payload
    page = open_page()
    result = page.evaluate(
        """async (token) => {
            const m = await import("/chat-client.js");
            return {
                delays: [0, 1, 5, 30].map((n) => m.backoffDelay(n, 500, 15000, () => 0)),
                maxDelay: m.backoffDelay(30, 500, 15000, () => 1),
                claims: m.jwtClaims(token),
                garbage: m.jwtClaims("not a token"),
                url: m.webSocketUrl("/ws", "a+b", "https://chat.example/app/"),
                ids: new Set(Array.from({length: 100}, m.newId)).size,
            };
        }""",
        f"e30.{payload}.sig",
    )
    assert result["delays"] == [250, 500, 7500, 7500]
    assert result["maxDelay"] == 15000
    assert result["claims"] == claims
    assert result["garbage"] == {}
    assert result["url"] == "wss://chat.example/ws?token=a%2Bb"
    assert result["ids"] == 100


CONTRACT_JS = (Path(__file__).parent / "chat_client_contract.js").read_text(encoding="utf-8")


def test_chat_client_outbox_contract(open_page: Callable[..., Page]) -> None:
    result = open_page().evaluate(CONTRACT_JS)
    assert result["sentBeforeBind"] == 0  # nothing but pings before `authenticated`
    assert result["firstSocketSends"] == [True]
    assert result["url"].endswith("/ws?token=t0")
    assert result["resentSameId"]  # same client_message_id: the server stores it once
    assert result["afterAck"] == 0
    assert result["tooBig"] == ["failed", "too_large", 0]
    assert result["limitedState"] == "queued"
    assert result["limitedResent"] == 2  # the first try, then once after retry_after_ms
    assert result["states"] == [
        "typed offline:queued",
        "typed offline:sending",
        "typed offline:queued",
        "typed offline:sending",
        "typed offline:sent",
        "too big:sending",
        "too big:failed",
        "limited:sending",
        "limited:queued",
        "limited:sending",
    ]
    assert result["refused"] == ["invalid token", "stopped"]
