"""The browser client in a real Chromium, against a real handler process.

Playwright's sync API runs its own event loop, so these are plain (non-async) tests and the
handler runs as a subprocess, which also lets one test kill and restart it on the same port.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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
PRESENCE_GRACE_S = 0.5  # the live server announces a user offline this soon, not after 5 s
TYPING = "\u2026"  # the ellipsis of "bob is typing…"


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


def page_opener(browser: Browser, url: str) -> Iterator[Callable[..., Page]]:
    """Open the client in a fresh browser profile; fail the test on any uncaught JS error.
    `fake_clock` installs Playwright's clock before the page loads, so every timer of the page
    follows it; other keyword arguments go to the browser context (`locale`, `timezone_id`)."""
    page_errors: list[str] = []
    contexts = []

    def open_page(
        viewport: dict[str, int] = DESKTOP,
        route: Callable[[WebSocketRoute], None] | None = None,
        *,
        fake_clock: bool = False,
        **context_options: Any,
    ) -> Page:
        context = browser.new_context(viewport=viewport, **context_options)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        if route is not None:
            page.route_web_socket(re.compile(r"/ws"), route)
        if fake_clock:
            page.clock.install()  # time flows as usual until the test moves it
        page.goto(url)
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert page_errors == []


@pytest.fixture
def open_page(browser: Browser, server: HandlerProcess) -> Iterator[Callable[..., Page]]:
    yield from page_opener(browser, server.url)


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


ACKNOWLEDGED = ", ".join(f'[data-state="{state}"]' for state in ("sent", "delivered", "read"))


def logged(page: Page, direction: str, frame_type: str) -> Any:
    return page.locator(f'#frame-list li[data-direction="{direction}"][data-type="{frame_type}"]')


def test_two_users_create_a_chat_and_talk_both_ways(open_page: Callable[..., Page]) -> None:
    alice = sign_in(open_page(), "alice")
    bob = sign_in(open_page(), "bob")

    start_chat(alice, "bob")
    expect(alice.locator("#conversation-title")).to_have_text("bob")
    send(alice, "Hi Bob, lunch at noon?")
    mine = alice.locator(".bubble.own")
    # Version 2: the server acknowledged it, and bob is online, so it is delivered at once
    # (a `receipt` of kind delivered): two grey ticks.
    expect(mine).to_have_attribute("data-state", "delivered")
    expect(mine.locator(".delivery")).to_have_text("Delivered")

    chat_with_alice = bob.locator(".chat-item", has_text="alice")
    expect(chat_with_alice.locator(".badge")).to_have_text("1")
    chat_with_alice.click()
    expect(bubbles(bob)).to_have_text(["Hi Bob, lunch at noon?"])
    expect(bob.locator(".bubble.theirs .sender")).to_have_text("alice")
    expect(chat_with_alice.locator(".badge")).to_have_count(0)
    expect(mine).to_have_attribute("data-state", "read")  # bob opened the chat: mark_read
    expect(mine.locator(".delivery")).to_have_text("Read")

    # Shift+Enter is a new line, Enter sends.
    box = bob.get_by_label("Message", exact=True)
    box.fill("Sure!")
    box.press("Shift+Enter")
    box.press_sequentially("Grüße from the second line.")
    box.press("Enter")
    expect(bubbles(alice)).to_have_text(
        ["Hi Bob, lunch at noon?", "Sure!\nGrüße from the second line."]
    )
    # Acknowledged, and read at once: alice has the chat open on screen.
    expect(bob.locator(".bubble.own")).to_have_attribute("data-state", "read")

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
    alice.locator("#frame-log summary").click()  # folded again for the screenshot
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
    save_screenshot(erin.screenshot(), "screenshot-web-phone.png", docs=True)
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
        # Every own message acknowledged (version 2 shows sent, delivered or read for those).
        expect(page.locator(f".bubble.own:not({ACKNOWLEDGED})")).to_have_count(0)
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
    expect(toast.locator("strong")).to_have_text("The server did not accept that request.")
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


def test_chat_client_model_contract(open_page: Callable[..., Page]) -> None:
    """Marks, unread counts and ticks of chat-client.js, from scripted server frames."""
    model = open_page().evaluate(CONTRACT_JS)["model"]
    assert model["syncOnBind"] == [0]  # fetch_chats {limit: 0}: the list with counts
    assert model["fromChatObject"] == 3  # unread_count of the chat object
    assert model["liveFromOther"] == 4
    assert model["askedAgain"] == [0, 0]  # read elsewhere, a message in between not held
    assert model["unreadWhileAsking"] == 4  # not guessed meanwhile
    assert model["afterAnswer"] == 3
    assert model["openFetch"] == ["c", 2, False]
    assert model["hasOlder"] is True
    assert model["olderBefore"] == "m3"
    assert model["held"] == [1, 2, 3, 4]
    assert model["hasOlderAfter"] is False
    assert model["countedHeld"] == 3  # all held: counted by the client, seqs 2..4 from bob
    assert model["markOnView"] == ["c", "m4", 0]
    assert model["viewedLive"] == [0, 1]  # on screen: not counted, one mark_read in flight
    assert model["secondMark"] == "m5"  # sent once the first was answered
    assert model["afterReceipts"] == 0
    assert model["twoNew"] == 2
    assert model["afterDelete"] == [1, True]  # a deleted message is not unread
    assert model["afterOwn"] == [0, 8]  # sending moves the sender's own read mark
    assert model["ticks"] == ["sent", "delivered", "read"]
    assert model["editSent"] == ["m8", "fixed", 1]
    assert model["heldBeforeAck"] == "text 8"  # the server's state until message_updated
    assert model["editDone"] == ["sent", 0, "fixed"]
    assert model["resync"] == [0]
    assert model["gapFetch"] == [[2, False]]  # the open chat's newest page, again
    assert model["afterGap"] == [[11, 12], True]
    assert model["gapMark"] == ["m12"]
    assert model["refresh"] == [[None, 2], ["m11", 2]]  # the newest page, then what is held
    assert model["refreshed"] == [[9, True], [10, False], [11, False], [12, False]]
    assert model["restored"] == model["expected"]
    assert model["restoredResent"] == [True]
    assert model["storageAfter"] == {}


def hold_sends_route(control: dict[str, Any]) -> Callable[[WebSocketRoute], None]:
    """A WebSocket route that can hold the page's `send_message` frames (the link is slow),
    drop them (they never reach the server), or drop the server's acknowledgements."""

    def route(ws: WebSocketRoute) -> None:
        upstream = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "send_message":
                if control.get("mode") == "hold":
                    control.setdefault("held", []).append((upstream, message))
                    return
                if control.get("mode") == "drop_sends":
                    return
                if control.get("mode") == "sabotage":
                    message = json.dumps({**frame, "recipient_id": "nobody-at-all"})
            upstream.send(message)

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            own_ack = frame.get("type") == "message" and frame.get("request_id") is not None
            if control.get("mode") == "drop_acks" and own_ack:
                return
            ws.send(message)

        ws.on_message(to_server)
        upstream.on_message(to_page)

    return route


def release_held(control: dict[str, Any]) -> None:
    control["mode"] = None
    for upstream, message in control.pop("held", []):
        upstream.send(message)


def chat_item(page: Page, name: str) -> Any:
    exact = page.locator(".chat-name", has_text=re.compile(f"^{re.escape(name)}$"))
    return page.locator(".chat-item", has=exact)


def test_ticks_and_unread_badges_follow_the_server_across_devices(
    open_page: Callable[..., Page],
) -> None:
    control: dict[str, Any] = {"mode": "hold"}
    kim = sign_in(open_page(route=hold_sends_route(control)), "kim")
    start_chat(kim, "lee")
    expect(kim.locator("#conversation-title")).to_have_text("lee")
    expect(kim.locator("#message-input")).to_be_focused()
    send(kim, "Are you there?")
    first = kim.locator(".bubble.own").first
    # sending (a clock) -> sent (stored; lee has never connected) -> delivered -> read
    expect(first).to_have_attribute("data-state", "sending")
    expect(first.locator(".delivery")).to_have_text("Sending…")
    release_held(control)
    expect(first).to_have_attribute("data-state", "sent")
    expect(first.locator(".delivery")).to_have_text("Sent")
    expect(first.locator(".content")).to_have_attribute("dir", "auto")

    lee_phone = sign_in(open_page(PHONE), "lee")  # the backlog delivers it
    expect(first).to_have_attribute("data-state", "delivered")
    expect(chat_item(lee_phone, "kim").locator(".badge")).to_have_text("1")
    expect(lee_phone).to_have_title("(1) Chat")

    lee_desk = sign_in(open_page(), "lee")
    # Already delivered to lee, so no backlog here: the count comes from the chat object.
    expect(chat_item(lee_desk, "kim").locator(".badge")).to_have_text("1")
    expect(logged(lee_desk, "in", "all_chats")).to_have_count(1)
    expect(logged(lee_desk, "in", "new_messages")).to_have_count(0)
    expect(logged(lee_desk, "out", "fetch_chats")).to_contain_text('"limit": 0')

    chat_item(lee_desk, "kim").click()
    expect(lee_desk.locator("#message-input")).to_be_focused()
    expect(lee_desk.locator("#message-list .divider")).to_have_text("New messages")
    expect(bubbles(lee_desk)).to_have_text(["Are you there?"])
    expect(logged(lee_desk, "out", "mark_read")).to_have_count(1)
    expect(first).to_have_attribute("data-state", "read")
    expect(first.locator(".delivery")).to_have_text("Read")
    # The other device's badge clears live (a receipt of kind read for lee himself).
    expect(chat_item(lee_phone, "kim").locator(".badge")).to_have_count(0)
    expect(lee_phone).to_have_title("Chat")
    expect(chat_item(lee_desk, "kim").locator(".badge")).to_have_count(0)

    # A message into a chat that is open on screen is read at once; the phone stays clear.
    send(kim, "Great, see you at the station.")
    second = kim.locator(".bubble.own").nth(1)
    expect(second).to_have_attribute("data-state", "read")
    expect(bubbles(lee_desk)).to_have_text(["Are you there?", "Great, see you at the station."])
    expect(chat_item(lee_phone, "kim").locator(".chat-preview")).to_have_text(
        "Great, see you at the station."
    )
    expect(chat_item(lee_phone, "kim").locator(".badge")).to_have_count(0)
    expect(chat_item(kim, "lee").locator(".chat-preview .tick-read")).to_have_count(1)
    # The day separator above the first message, and the two bubbles of kim are one group.
    expect(lee_desk.locator(".day-separator")).to_have_text("Today")
    expect(lee_desk.locator(".bubble.theirs.group-start")).to_have_count(1)

    # lee replies from the phone; kim's unread badge counts it, and opening clears it.
    start_chat(kim, "lee-two")
    expect(kim.locator("#conversation-title")).to_have_text("lee-two")
    chat_item(lee_phone, "kim").click()
    expect(lee_phone.locator("#message-list .divider")).to_have_count(0)  # nothing was unread
    send(lee_phone, "On my way")
    send(lee_phone, "Platform 4")
    expect(chat_item(kim, "lee").locator(".badge")).to_have_text("2")
    lee_phone.get_by_role("button", name="Back to chats").click()
    expect(chat_item(lee_phone, "kim").locator(".chat-preview .tick-delivered")).to_have_count(1)
    chat_item(kim, "lee").click()
    expect(chat_item(kim, "lee").locator(".badge")).to_have_count(0)
    expect(chat_item(lee_phone, "kim").locator(".chat-preview .tick-read")).to_have_count(1)
    save_screenshot(lee_phone.screenshot(), "screenshot-web-phone-list.png", docs=True)


def open_message_menu(page: Page, text: str) -> None:
    bubble = page.locator(".bubble.own", has=page.locator(".content", has_text=text))
    bubble.hover()
    bubble.get_by_role("button", name="Message actions").click()
    expect(page.get_by_role("menu")).to_be_visible()


def test_edit_and_delete_are_live_on_every_device(open_page: Callable[..., Page]) -> None:
    offline = {"on": False, "sockets": []}

    def flaky(ws: WebSocketRoute) -> None:
        if offline["on"]:
            ws.close(code=4001, reason="offline")
            return
        offline["sockets"].append((ws, ws.connect_to_server()))

    mia_desk = sign_in(open_page(), "mia")
    mia_phone = sign_in(open_page(PHONE), "mia")
    ned = sign_in(open_page(route=flaky), "ned")
    start_chat(mia_desk, "ned")
    send(mia_desk, "See you at 5")
    send(mia_desk, "Bring the the map")
    chat_item(ned, "mia").click()
    chat_item(mia_phone, "ned").click()
    for page in (mia_desk, mia_phone, ned):
        expect(bubbles(page)).to_have_text(["See you at 5", "Bring the the map"])

    # Edit from the bubble's menu, in the composer.
    open_message_menu(mia_desk, "Bring the the map")
    mia_desk.get_by_role("menuitem", name="Edit").click()
    box = mia_desk.get_by_label("Message", exact=True)
    expect(box).to_have_value("Bring the the map")
    expect(box).to_be_focused()
    expect(mia_desk.locator("#edit-bar")).to_contain_text("Edit message")
    box.fill("Bring the map")
    save_screenshot(mia_desk.screenshot(), "screenshot-web-edit.png", docs=True)
    box.press("Enter")
    expect(logged(mia_desk, "out", "edit_message")).to_have_count(1)
    expect(box).to_have_value("")
    for page in (mia_desk, mia_phone, ned):
        expect(bubbles(page)).to_have_text(["See you at 5", "Bring the map"])
        expect(page.locator(".bubble", has_text="Bring the map").locator(".edited")).to_have_text(
            "edited"
        )

    # Delete from the other device, with a right click.
    target = mia_phone.locator(".bubble.own", has=mia_phone.locator(".content", has_text="at 5"))
    target.click(button="right")
    mia_phone.get_by_role("menuitem", name="Delete").click()
    dialog = mia_phone.locator("#delete-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Delete").click()
    for page in (mia_desk, mia_phone, ned):
        expect(bubbles(page)).to_have_text(["Message deleted", "Bring the map"])
        expect(page.locator(".bubble.deleted")).to_have_count(1)
    expect(mia_desk.locator(".bubble.deleted .bubble-actions")).to_have_count(0)

    # ned is away while mia changes two more messages: they arrive in one updated_messages
    # frame when he is back, each in its final state.
    send(mia_desk, "Third, to be deleted")
    expect(bubbles(ned)).to_have_count(3)
    offline["on"] = True
    for ws, upstream in offline["sockets"]:
        ws.close(code=4001, reason="offline")
        upstream.close()
    expect(ned.locator("#connection")).to_have_attribute("data-state", "waiting")
    open_message_menu(mia_desk, "Bring the map")
    mia_desk.get_by_role("menuitem", name="Edit").click()
    mia_desk.get_by_label("Message", exact=True).fill("Bring the map, please")
    mia_desk.get_by_label("Message", exact=True).press("Enter")
    open_message_menu(mia_desk, "Third, to be deleted")
    mia_desk.get_by_role("menuitem", name="Delete").click()
    mia_desk.locator("#delete-dialog").get_by_role("button", name="Delete").click()
    expected = ["Message deleted", "Bring the map, please", "Message deleted"]
    expect(bubbles(mia_phone)).to_have_text(expected)
    expect(bubbles(ned)).to_have_text(["Message deleted", "Bring the map", "Third, to be deleted"])
    offline["on"] = False
    expect(ned.locator("#connection")).to_have_text("Online", timeout=RECONNECT_TIMEOUT_MS)
    expect(bubbles(ned)).to_have_text(expected)
    expect(logged(ned, "in", "updated_messages")).to_have_count(1)
    expect(chat_item(ned, "mia").locator(".chat-preview")).to_have_text("Message deleted")
    expect(mia_desk.locator(".bubble[data-change]")).to_have_count(0)


def test_unsent_messages_survive_a_reload_and_are_sent_once(
    open_page: Callable[..., Page], browser: Browser, server: HandlerProcess
) -> None:
    control: dict[str, Any] = {"mode": None}
    oli = sign_in(open_page(route=hold_sends_route(control)), "oli")
    pat = sign_in(open_page(), "pat")
    start_chat(oli, "pat")
    send(oli, "hello")
    chat_item(pat, "oli").click()
    expect(bubbles(pat)).to_have_text(["hello"])

    control["mode"] = "drop_sends"  # never reaches the server
    send(oli, "typed while the link is down")
    control["mode"] = "drop_acks"  # stored, but the acknowledgement is lost
    send(oli, "stored, but the ack is lost")
    expect(bubbles(pat)).to_have_text(["hello", "stored, but the ack is lost"])
    pending = oli.locator('.bubble.own[data-state="sending"]')
    expect(pending).to_have_count(2)
    oli.get_by_label("Message", exact=True).fill("a draft, not sent yet")

    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.type)
        dialog.accept()

    oli.on("dialog", on_dialog)
    control["mode"] = None
    oli.reload()
    assert dialogs == ["beforeunload"]  # warned: something typed was not acknowledged

    expect(oli.locator("#connection")).to_have_text("Online")
    expect(oli.locator("#conversation-title")).to_have_text("pat")  # the open chat is kept
    expect(oli.get_by_label("Message", exact=True)).to_have_value("a draft, not sent yet")
    expected = ["hello", "stored, but the ack is lost", "typed while the link is down"]
    expect(bubbles(oli)).to_have_text(expected)
    expect(oli.locator(f".bubble.own:not({ACKNOWLEDGED})")).to_have_count(0)
    expect(bubbles(pat)).to_have_text(expected)  # the resend of the stored one is not pushed
    assert oli.evaluate("JSON.parse(localStorage.getItem('chat.outbox.oli')).entries") == {}

    # The server's history has each message once.
    fresh = browser.new_context(viewport=DESKTOP)
    try:
        page = fresh.new_page()
        page.goto(server.url)
        sign_in(page, "pat")
        chat_item(page, "oli").click()
        expect(bubbles(page)).to_have_text(expected)
    finally:
        fresh.close()
    expect(bubbles(pat)).to_have_count(3)


def test_long_texts_and_refused_sends_are_never_lost(open_page: Callable[..., Page]) -> None:
    control: dict[str, Any] = {"mode": None}
    quin = sign_in(open_page(route=hold_sends_route(control)), "quin")
    start_chat(quin, "rae")
    box = quin.get_by_label("Message", exact=True)
    counter = quin.locator("#char-count")
    box.fill("x" * 3000)
    expect(counter).to_be_hidden()
    box.fill("é" * 4100)  # a paste over the limit is kept whole and counted, not cut
    expect(counter).to_have_text("4100 / 4096: 4 too many")
    expect(quin.locator("#send-button")).to_be_disabled()
    box.press("Enter")
    expect(box).to_have_value("é" * 4100)
    expect(quin.locator(".bubble")).to_have_count(0)
    box.press("Control+End")
    for _ in range(4):
        box.press("Backspace")
    expect(counter).to_have_text("4096 / 4096")
    box.press("Enter")
    expect(quin.locator(".bubble.own")).to_have_attribute("data-state", "sent")
    expect(counter).to_be_hidden()

    # A send the server refuses stays on screen, and can be retried (same client_message_id)
    # or taken back into the composer.
    control["mode"] = "sabotage"
    send(quin, "refused the first time")
    failed = quin.locator('.bubble.own[data-state="failed"]')
    expect(failed).to_have_count(1)
    expect(failed.locator(".failure")).to_contain_text("Not sent: The server did not accept")
    control["mode"] = None
    failed.get_by_role("button", name="Retry").click()
    expect(failed).to_have_count(0)
    expect(bubbles(quin).last).to_have_text("refused the first time")
    expect(quin.locator(".bubble.own").last).to_have_attribute("data-state", "sent")

    control["mode"] = "sabotage"
    send(quin, "fix me")
    expect(failed).to_have_count(1)
    control["mode"] = None
    failed.get_by_role("button", name="Edit").click()
    expect(failed).to_have_count(0)
    expect(box).to_have_value("fix me")
    box.fill("fixed")
    box.press("Enter")
    expect(bubbles(quin).last).to_have_text("fixed")
    expect(bubbles(quin)).to_have_count(3)


def test_history_pages_keep_the_reading_position(open_page: Callable[..., Page]) -> None:
    sam = sign_in(open_page(), "sam")
    start_chat(sam, "tia")
    expect(sam.locator("#conversation-title")).to_have_text("tia")
    chat_id = sam.evaluate("sessionStorage.getItem('chat.openChat')")
    # 70 messages, paced under the rate limit, through a second socket of sam's.
    sent = sam.evaluate(
        """async ({chatId, count}) => {
            const {token} = JSON.parse(sessionStorage.getItem("chat.session"));
            const url = new URL("/ws", location.href);
            url.protocol = "ws:";
            url.searchParams.set("token", token);
            const ws = new WebSocket(url);
            let acks = 0;
            const done = new Promise((resolve) => ws.addEventListener("message", (event) => {
                const frame = JSON.parse(event.data);
                if (frame.type === "message" && ++acks === count) resolve(acks);
            }));
            await new Promise((resolve) => ws.addEventListener("open", resolve));
            for (let n = 1; n <= count; n += 1) {
                ws.send(JSON.stringify({type: "send_message", chat_id: chatId,
                    recipient_id: "tia", content: `number ${n}`, client_message_id: `h${n}`}));
                await new Promise((resolve) => setTimeout(resolve, 60));
            }
            const result = await done;
            ws.close();
            return result;
        }""",
        {"chatId": chat_id, "count": 70},
    )
    assert sent == 70

    # Delivered to a first device of tia's (her backlog), so the second one holds none of
    # them and pages through the server's history.
    first_device = sign_in(open_page(), "tia")
    expect(chat_item(first_device, "sam").locator(".badge")).to_have_text("70")
    tia = sign_in(open_page(), "tia")
    expect(chat_item(tia, "sam").locator(".badge")).to_have_text("70")
    chat_item(tia, "sam").click()
    expect(bubbles(tia)).to_have_count(50)  # the newest page
    expect(bubbles(tia).first).to_have_text("number 21")
    older = tia.get_by_role("button", name="Load older messages")
    expect(older).to_be_visible()
    expect(tia.locator("#message-list .divider")).to_be_visible()  # all unread: at the top

    older.scroll_into_view_if_needed()
    anchor = tia.locator('.bubble[data-seq="21"]')  # the oldest one held, right below it
    before = anchor.bounding_box()
    older.click()
    expect(bubbles(tia)).to_have_count(70)
    expect(bubbles(tia).first).to_have_text("number 1")
    expect(older).to_be_hidden()
    after = anchor.bounding_box()
    assert before is not None
    assert after is not None
    assert abs(after["y"] - before["y"]) < 2  # the page grew above, the reading stayed put

    # Scrolled up, a new message shows the jump button instead of pulling the view down.
    send(sam, "number 71")
    jump = tia.get_by_role("button", name=re.compile("New messages"))
    expect(jump).to_be_visible()
    expect(jump).to_contain_text("1")
    jump.click()
    expect(jump).to_be_hidden()
    expect(bubbles(tia).last).to_be_in_viewport()
    expect(chat_item(tia, "sam").locator(".badge")).to_have_count(0)


# ---------------------------------------------------------------------------- group chats

GROUP_CONTRACT_JS = """async () => {
    const { ChatClient, parseUserIds, readersOf } = await import("/chat-client.js");
    class FakeSocket extends EventTarget {
        static OPEN = 1;
        static last = null;
        constructor(url) {
            super();
            this.url = url;
            this.readyState = 1;
            this.sent = [];
            FakeSocket.last = this;
            setTimeout(() => this.dispatchEvent(new Event("open")));
        }
        send(text) { this.sent.push(JSON.parse(text)); }
        receive(frame) {
            this.dispatchEvent(new MessageEvent("message", { data: JSON.stringify(frame) }));
        }
        close() {}
    }
    const tick = () => new Promise((resolve) => setTimeout(resolve, 10));
    const client = new ChatClient({ url: "/ws", token: "t", WebSocket: FakeSocket });
    const removed = [];
    client.addEventListener("chat-removed", (event) => removed.push(event.detail));
    client.start();
    await tick();
    const ws = FakeSocket.last;
    const sent = (type) => ws.sent.filter((frame) => frame.type === type);
    ws.receive({ type: "authenticated", user_id: "ann" });
    const marks = (seq) => ({ ann: seq, ben: seq, cid: seq });
    const group = (extra = {}) => ({
        chat_id: "g", kind: "group", title: "Trip", participants: ["ann", "ben", "cid"],
        created_by: "ann", created_at: "2024-01-01T00:00:00.000Z", last_message: null,
        unread_count: 0, read_up_to: marks(0), delivered_up_to: marks(0), ...extra,
    });
    const out = {};
    const create = client.createGroup({ title: "Trip", memberIds: ["ben", "cid"] });
    out.create = sent("create_group").map((f) => [f.title, f.member_ids, f.request_id === create]);
    ws.receive({ type: "new_chats", data: [group()], request_id: create });
    out.list = client.chatList().map((chat) => [chat.kind, chat.title, chat.participants.length]);
    client.sendMessage({ chatId: "g", recipientId: "ben", content: "hi all" });
    out.sendHasRecipient = "recipient_id" in sent("send_message")[0];
    const mine = { message_id: "m1", chat_id: "g", sender_id: "ann", content: "hi all",
        timestamp: "2024-01-01T00:00:01.000Z", seq: 1,
        client_message_id: sent("send_message")[0].client_message_id };
    ws.receive({ type: "message", ...mine, request_id: sent("send_message")[0].request_id });
    out.readers = [client.readers("g", mine)];
    ws.receive({ type: "receipt", chat_id: "g", user_id: "cid", kind: "read", seq: 1,
        message_id: "m1", timestamp: "2024-01-01T00:00:02.000Z" });
    out.readers.push(client.readers("g", mine), client.status("g", mine));
    const add = client.addMembers("g", ["dov"]);
    out.add = sent("add_members").map((f) => [f.chat_id, f.member_ids, f.request_id === add]);
    ws.receive({ type: "chat_updated", request_id: add,
        data: group({ participants: ["ann", "ben", "cid", "dov"],
            read_up_to: { ...marks(0), cid: 1, dov: 1 } }) });
    // dov joined after m1: his mark starts at the newest seq, so the wire counts him.
    out.afterAdd = [client.chat("g").participants.length, client.readers("g", mine)];
    const remove = client.removeMember("g", "dov");
    out.remove = sent("remove_member").map((f) => [f.chat_id, f.user_id]);
    ws.receive({ type: "chat_updated", request_id: remove,
        data: group({ read_up_to: { ...marks(0), cid: 1 } }) });
    out.afterRemove = [client.chat("g").participants, client.readers("g", mine), removed.length];
    // A queued send to the group, then this user leaves: the chat and the send go.
    client.sendMessage({ chatId: "g", content: "never mind" });
    const leave = client.leaveChat("g");
    out.leave = sent("remove_member").at(-1).user_id;
    ws.receive({ type: "chat_updated", request_id: leave,
        data: group({ participants: ["ben", "cid"] }) });
    out.afterLeave = [client.chat("g") === undefined, client.chatList().length,
        client.outbox.length, removed.map((r) => [r.chatId, r.title, r.kind, r.left])];
    // Removed by the creator while away: the chat is missing from all_chats.
    ws.receive({ type: "new_chats", data: [group({ chat_id: "h", title: "Work" })] });
    ws.receive({ type: "all_chats", data: [], request_id: sent("fetch_chats")[0].request_id });
    out.gone = removed.map((r) => [r.chatId, r.left]);
    // A late member: the server has nothing older for them, so nothing "older" to load.
    const late = group({ chat_id: "k", participants: ["ann", "zed"] });
    ws.receive({ type: "new_chats", data: [late] });
    client.openChat("k");
    const page = sent("fetch_messages").at(-1);
    ws.receive({ type: "all_messages", chat_id: "k", data: [], has_more: false,
        request_id: page.request_id });
    ws.receive({ type: "message", ...mine, chat_id: "k", message_id: "k6", seq: 6,
        sender_id: "zed", client_message_id: undefined });
    out.lateMember = [client.messages("k").map((m) => m.seq), client.hasOlder("k")];
    out.parsed = parseUserIds(" bob, carol;dave  bob\\n erin,,");
    const abc = { participants: ["a", "b", "c"], readUpTo: { a: 5, b: 2 } };
    out.pure = readersOf(abc, { seq: 2 }, "a");
    client.stop();
    return out;
}"""


def test_chat_client_group_model_contract(open_page: Callable[..., Page]) -> None:
    """Group frames of chat-client.js against a scripted server: what goes out, what the model
    makes of `new_chats`, `chat_updated` and receipts, and when a chat leaves the list."""
    out = open_page().evaluate(GROUP_CONTRACT_JS)
    assert out["create"] == [["Trip", ["ben", "cid"], True]]
    assert out["list"] == [["group", "Trip", 3]]
    assert out["sendHasRecipient"] is False  # a group message has no recipient_id
    assert out["readers"] == [[], ["cid"], "sent"]  # read by one of two: not "read" yet
    assert out["add"] == [["g", ["dov"], True]]
    assert out["afterAdd"] == [4, ["cid", "dov"]]
    assert out["remove"] == [["g", "dov"]]
    assert out["afterRemove"] == [["ann", "ben", "cid"], ["cid"], 0]  # others removed: no event
    assert out["leave"] == "ann"
    assert out["afterLeave"] == [True, 0, 0, [["g", "Trip", "group", True]]]
    assert out["gone"] == [["g", True], ["h", False]]
    assert out["lateMember"] == [[6], False]
    assert out["parsed"] == ["bob", "carol", "dave", "erin"]
    assert out["pure"] == ["b"]  # not the sender, and only marks that reached the seq


def group_shot(page: Page, name: str, docs: str | None = None) -> None:
    """A screenshot in test-artifacts/, and in $GROUP_SHOTS_DIR too when that is set; `docs`
    names the picture of docs/ it refreshes (with UPDATE_SCREENSHOTS=1)."""
    page.mouse.move(0, 0)  # no hover effects in the picture
    png = page.screenshot()
    save_screenshot(png, name)
    if docs is not None:
        save_screenshot(png, docs, docs=True)
    target = os.environ.get("GROUP_SHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / name).write_bytes(png)


def open_new_group_dialog(page: Page) -> Any:
    page.get_by_role("button", name="New group").click()
    dialog = page.locator("#group-dialog")
    expect(dialog).to_be_visible()
    return dialog


def create_group(page: Page, title: str, members: str, *, shot: str | None = None) -> None:
    dialog = open_new_group_dialog(page)
    dialog.get_by_label("Group name").fill(title)
    dialog.get_by_label("Members", exact=True).fill(members)
    dialog.get_by_label("Group name").click()  # leaving the field turns the rest into chips
    if shot is not None:
        group_shot(page, shot)
    dialog.get_by_role("button", name="Create group").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#conversation-title")).to_have_text(title)


def open_members(page: Page) -> Any:
    page.get_by_role("button", name="Group members").click()
    panel = page.locator("#members-dialog")
    expect(panel).to_be_visible()
    return panel


def senders(page: Page) -> Any:
    return page.locator("#message-list .bubble.theirs .sender")


def read_by(page: Page, text: str) -> Any:
    own = page.locator(".bubble.own", has=page.locator(".content", has_text=text))
    return own.locator(".read-by")


def test_group_chat_members_messages_receipts_and_leaving(
    open_page: Callable[..., Page],
) -> None:
    ana = sign_in(open_page(), "ana")
    bruno = sign_in(open_page(), "bruno")
    cara = sign_in(open_page(PHONE), "cara")

    create_group(ana, "Weekend trip", "bruno, cara", shot="groups-new-dialog-desktop.png")
    expect(ana.locator("#conversation-id")).to_have_text("3 members")
    expect(logged(ana, "out", "create_group")).to_contain_text('"member_ids"')
    for page in (bruno, cara):
        expect(chat_item(page, "Weekend trip")).to_be_visible()
        expect(chat_item(page, "Weekend trip").locator(".chat-preview")).to_have_text(
            "No messages yet"
        )

    send(ana, "Who is in for Saturday?")
    first = read_by(ana, "Who is in for Saturday?")
    expect(ana.locator(".bubble.own")).to_have_attribute("data-state", "delivered")
    expect(first).to_have_count(0)  # read by nobody yet
    expect(ana.locator("#message-list .sender")).to_have_count(0)  # no name on your own
    sent_frame = logged(ana, "out", "send_message")
    expect(sent_frame).to_have_count(1)
    expect(sent_frame).not_to_contain_text("recipient_id")
    for page in (bruno, cara):
        item = chat_item(page, "Weekend trip")
        expect(item.locator(".badge")).to_have_text("1")
        expect(item.locator(".chat-preview")).to_have_text("ana: Who is in for Saturday?")

    # "Read by" rises as the others open the chat.
    chat_item(bruno, "Weekend trip").click()
    expect(bubbles(bruno)).to_have_text(["Who is in for Saturday?"])
    expect(senders(bruno)).to_have_text(["ana"])
    expect(bruno.locator("#conversation-id")).to_have_text("3 members")
    expect(first).to_have_text("Read by 1")
    chat_item(cara, "Weekend trip").click()
    expect(bubbles(cara)).to_have_text(["Who is in for Saturday?"])
    expect(first).to_have_text("Read by 2")
    expect(ana.locator(".bubble.own")).to_have_attribute("data-state", "read")
    first.click()
    expect(ana.locator("#readers-popover")).to_be_visible()
    expect(ana.locator("#readers-heading")).to_have_text("Read by 2 of 2")
    expect(ana.locator("#readers-list .reader-name")).to_have_text(["bruno", "cara"])
    group_shot(ana, "groups-readers-desktop.png")
    ana.keyboard.press("Escape")
    expect(ana.locator("#readers-popover")).to_be_hidden()

    send(bruno, "Me! I'll bring the tent.")
    for page in (ana, cara):
        expect(bubbles(page)).to_have_text(["Who is in for Saturday?", "Me! I'll bring the tent."])
    expect(senders(ana)).to_have_text(["bruno"])
    expect(senders(cara)).to_have_text(["ana", "bruno"])
    expect(bruno.locator(".bubble.own .sender")).to_have_count(0)

    # cara is away while the others talk; back, she gets each message exactly once.
    cara.close()
    send(ana, "Train at 9:40")
    send(bruno, "Tickets booked for all three")
    expect(bubbles(ana)).to_have_count(4)
    expect(bubbles(bruno)).to_have_count(4)
    expect(read_by(ana, "Train at 9:40")).to_have_text("Read by 1")  # bruno has it open
    cara = sign_in(open_page(PHONE), "cara")
    expect(chat_item(cara, "Weekend trip").locator(".badge")).to_have_text("2")
    expect(logged(cara, "in", "new_messages")).to_have_count(1)
    chat_item(cara, "Weekend trip").click()
    everything = [
        "Who is in for Saturday?",
        "Me! I'll bring the tent.",
        "Train at 9:40",
        "Tickets booked for all three",
    ]
    expect(bubbles(cara)).to_have_text(everything)
    expect(read_by(ana, "Train at 9:40")).to_have_text("Read by 2")
    send(cara, "Great, see you at the station!")
    expect(read_by(cara, "see you at the station")).to_have_text("Read by 2")
    expect(bubbles(ana)).to_have_text([*everything, "Great, see you at the station!"])
    expect(senders(cara)).to_have_text(["ana", "bruno", "ana", "bruno"])
    group_shot(ana, "groups-open-desktop.png", docs="screenshot-web-group.png")
    group_shot(cara, "groups-open-phone.png")

    # The members panel: the creator can add and remove; anyone can add.
    panel = open_members(ana)
    members = panel.locator("#member-list .member")
    expect(members.locator(".member-id")).to_have_text(["ana", "bruno", "cara"])
    expect(panel.locator(".member", has_text="ana").locator(".role")).to_have_text("creator")
    expect(panel.get_by_role("button", name="Remove bruno")).to_be_visible()
    panel.get_by_label("Add members").fill("dario")
    panel.get_by_role("button", name="Add", exact=True).click()
    expect(panel.locator("#members-status")).to_have_text("Added dario.")
    expect(members.locator(".member-id")).to_have_text(["ana", "bruno", "cara", "dario"])
    expect(panel.locator("#members-count")).to_have_text("4 members")
    group_shot(ana, "groups-members-desktop.png", docs="screenshot-web-group-members.png")
    panel.get_by_role("button", name="Close").click()
    expect(bruno.locator("#conversation-id")).to_have_text("4 members")

    # dario sees the group, but none of what was said before he joined.
    dario = sign_in(open_page(), "dario")
    chat_item(dario, "Weekend trip").click()
    expect(dario.locator("#no-messages")).to_be_visible()
    expect(bubbles(dario)).to_have_count(0)
    expect(dario.get_by_role("button", name="Load older messages")).to_be_hidden()
    send(ana, "Welcome, dario!")
    expect(bubbles(dario)).to_have_text(["Welcome, dario!"])
    expect(senders(dario)).to_have_text(["ana"])
    expect(read_by(ana, "Welcome, dario!")).to_have_text(re.compile(r"Read by [1-3]"))
    # dario read up to the welcome, but joined after this one: he is not one of its readers.
    expect(read_by(ana, "Train at 9:40")).to_have_text("Read by 2")

    # Not the creator: no "Remove" buttons, but a way out.
    cara_panel = open_members(cara)
    expect(cara_panel.locator("#member-list .member")).to_have_count(4)
    expect(cara_panel.locator(".member-remove")).to_have_count(0)
    group_shot(cara, "groups-members-phone.png")
    cara_panel.get_by_role("button", name="Close").click()

    # bruno leaves (with a confirm): the chat is gone for him, the others see one member less.
    bruno_panel = open_members(bruno)
    bruno_panel.get_by_role("button", name="Leave group").click()
    confirm = bruno.locator("#group-confirm")
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text("Leave \u201cWeekend trip\u201d?")
    confirm.get_by_role("button", name="Leave group").click()
    expect(chat_item(bruno, "Weekend trip")).to_have_count(0)
    expect(bruno.locator(".toast.notice")).to_contain_text("You left \u201cWeekend trip\u201d.")
    expect(bruno.locator("#conversation-title")).to_have_text("Select a chat")
    expect(bruno_panel).to_be_hidden()
    expect(ana.locator("#conversation-id")).to_have_text("3 members")
    expect(logged(bruno, "in", "error")).to_have_count(0)

    # The creator removes dario, who is told and loses the chat; a reload does not bring it back.
    panel = open_members(ana)
    panel.get_by_role("button", name="Remove dario").click()
    ana.locator("#group-confirm").get_by_role("button", name="Remove").click()
    expect(panel.locator("#member-list .member-id")).to_have_text(["ana", "cara"])
    expect(chat_item(dario, "Weekend trip")).to_have_count(0)
    expect(dario.locator(".toast.notice")).to_contain_text(
        "You are no longer a member of \u201cWeekend trip\u201d."
    )
    expect(dario.locator("#conversation-title")).to_have_text("Select a chat")
    bruno.reload()
    expect(bruno.locator("#connection")).to_have_text("Online")
    expect(logged(bruno, "in", "all_chats")).to_have_count(1)
    expect(chat_item(bruno, "Weekend trip")).to_have_count(0)


def refuse_group_titles_route(ws: WebSocketRoute) -> None:
    """Passes everything through, but sends a create_group titled "SERVER CHECK" with an empty
    title, so the server's own refusal can be seen in the dialog."""
    upstream = ws.connect_to_server()

    def to_server(message: str | bytes) -> None:
        frame = json.loads(message)
        if frame.get("type") == "create_group" and frame.get("title") == "SERVER CHECK":
            message = json.dumps({**frame, "title": ""})
        upstream.send(message)

    ws.on_message(to_server)
    upstream.on_message(ws.send)


def test_new_group_dialog_refuses_what_the_server_would(open_page: Callable[..., Page]) -> None:
    eli = sign_in(open_page(PHONE, route=refuse_group_titles_route), "eli")
    dialog = open_new_group_dialog(eli)
    create = dialog.get_by_role("button", name="Create group")
    title_error = dialog.locator("#group-title-error")
    members_error = dialog.locator("#group-members-error")
    members = dialog.get_by_label("Members", exact=True)

    members.fill("fay gus,")  # separators turn ids into chips
    expect(dialog.locator(".chip .chip-name")).to_have_text(["fay", "gus"])
    create.click()
    expect(title_error).to_have_text("Give the group a name.")
    expect(dialog.get_by_label("Group name")).to_be_focused()
    dialog.get_by_label("Group name").fill("   ")
    create.click()
    expect(title_error).to_have_text("Give the group a name.")
    group_shot(eli, "groups-new-dialog-phone.png")
    expect(logged(eli, "out", "create_group")).to_have_count(0)
    expect(dialog).to_be_visible()

    dialog.get_by_label("Group name").fill("Book club")
    dialog.get_by_role("button", name="Remove fay").click()
    dialog.get_by_role("button", name="Remove gus").click()
    create.click()
    expect(title_error).to_be_empty()
    expect(members_error).to_have_text("Add at least one member by user id.")
    members.fill("eli")
    create.click()
    expect(members_error).to_contain_text("in the group already")
    expect(logged(eli, "out", "create_group")).to_have_count(0)

    # What only the server can refuse is shown in the dialog too, next to the field it names.
    dialog.locator(".chip").get_by_role("button").click()
    members.fill("fay")
    dialog.get_by_label("Group name").fill("SERVER CHECK")
    create.click()
    expect(title_error).to_contain_text("The server did not accept that request.")
    expect(eli.locator(".toast")).to_have_count(0)
    expect(dialog).to_be_visible()
    dialog.get_by_label("Group name").fill("Book club")
    create.click()
    expect(dialog).to_be_hidden()
    expect(eli.locator("#conversation-title")).to_have_text("Book club")
    expect(eli.locator("#conversation-id")).to_have_text("2 members")


# ---------------------------------------------------------------------------- typing, presence

LIVE_CONTRACT_JS = """async () => {
    const { ChatClient } = await import("/chat-client.js");
    class FakeSocket extends EventTarget {
        static OPEN = 1;
        static last = null;
        constructor(url) {
            super();
            this.url = url;
            this.readyState = 1;
            this.sent = [];
            FakeSocket.last = this;
            setTimeout(() => this.dispatchEvent(new Event("open")));
        }
        send(text) { this.sent.push(JSON.parse(text)); }
        receive(frame) {
            this.dispatchEvent(new MessageEvent("message", { data: JSON.stringify(frame) }));
        }
        drop() {
            this.readyState = 3;
            this.dispatchEvent(new CloseEvent("close", { code: 1006 }));
        }
        close() {}
    }
    const tick = (ms = 10) => new Promise((resolve) => setTimeout(resolve, ms));
    const client = new ChatClient({ url: "/ws", token: "t", WebSocket: FakeSocket,
        typingRenewMs: 200, typingMuteMs: 300, backoffBaseMs: 1, backoffMaxMs: 2 });
    const events = new Set();
    for (const type of ["typing", "presence", "blocked", "error"]) {
        client.addEventListener(type, () => events.add(type));
    }
    let changed = new Set();
    client.addEventListener("change", (event) => {
        for (const chatId of event.detail.chatIds) changed.add(chatId);
    });
    client.start();
    await tick();
    let ws = FakeSocket.last;
    const sent = (type) => ws.sent.filter((frame) => frame.type === type);
    const out = {};
    ws.receive({ type: "authenticated", user_id: "ann" });
    out.onBind = ["fetch_chats", "fetch_blocked", "fetch_presence"].map((t) => sent(t).length);
    const direct = (chatId, peer) => ({ chat_id: chatId, kind: "direct", title: null,
        participants: ["ann", peer].sort(), created_by: "ann",
        created_at: "2024-01-01T00:00:00.000Z", last_message: null, unread_count: 0,
        read_up_to: {}, delivered_up_to: {} });
    const chats = Array.from({ length: 250 }, (_, n) => direct(`d${n}`, `u${n}`));
    chats.push({ ...direct("g", "x"), kind: "group", title: "G",
        participants: ["ann", "gus", "hal"] });
    ws.receive({ type: "all_chats", data: chats,
        request_id: sent("fetch_chats")[0].request_id });
    out.asked = sent("fetch_presence").map((frame) => frame.user_ids.length);
    out.groupAsked = sent("fetch_presence").some((frame) => frame.user_ids.includes("gus"));
    ws.receive({ type: "new_chats", data: [direct("n", "zoe")] });
    out.newChatAsked = sent("fetch_presence").at(-1).user_ids;
    ws.receive({ type: "all_chats", data: [...chats, direct("n", "zoe")] });
    out.askedOnce = sent("fetch_presence").length;

    ws.receive({ type: "presence", request_id: sent("fetch_presence").at(-1).request_id,
        data: [{ user_id: "zoe", online: true, last_seen: null },
               { user_id: "u1", online: false, last_seen: "2024-01-02T03:04:05.678Z" }] });
    out.presence = [client.presence("zoe"), client.presence("u1"), client.presence("nobody")];
    changed = new Set();
    ws.receive({ type: "presence",
        data: [{ user_id: "zoe", online: false, last_seen: "2024-01-03T00:00:00.000Z" }] });
    out.presenceLive = [client.presence("zoe"), [...changed]];

    // Typing goes out throttled: one `true` per renewal period, `false` only after a `true`.
    out.typingCalls = [client.typing("n"), client.typing("n")];
    await tick(220);
    out.typingCalls.push(client.typing("n"), client.typing("n", false), client.typing("n", false));
    out.typingFrames = sent("typing").map((frame) => [frame.chat_id, frame.active]);

    // Typists: in the order they started, each until expiry, active: false, or their message.
    ws.receive({ type: "typing", chat_id: "g", user_id: "gus", active: true, expires_in_ms: 80 });
    ws.receive({ type: "typing", chat_id: "g", user_id: "hal", active: true,
        expires_in_ms: 5000 });
    out.typists = [client.typists("g")];
    await tick(40);
    ws.receive({ type: "typing", chat_id: "g", user_id: "gus", active: true, expires_in_ms: 80 });
    await tick(50);
    out.typists.push(client.typists("g")); // renewed: still there past the first expiry
    changed = new Set();
    await tick(60);
    out.typists.push(client.typists("g"), [...changed]);
    ws.receive({ type: "message", message_id: "m1", chat_id: "g", sender_id: "hal",
        content: "hi", timestamp: "2024-01-01T00:00:01.000Z", seq: 1 });
    out.typists.push(client.typists("g"));
    ws.receive({ type: "typing", chat_id: "n", user_id: "zoe", active: true,
        expires_in_ms: 5000 });
    out.typists.push(client.typists("n"));
    ws.receive({ type: "typing", chat_id: "n", user_id: "zoe", active: false,
        expires_in_ms: 5000 });
    out.typists.push(client.typists("n"));

    // Blocking: the reply replaces the list; a blocked typist is gone; no typing to them.
    const block = client.blockUser("zoe");
    out.blockFrame = sent("block_user").map((frame) => [frame.user_id, frame.request_id === block]);
    ws.receive({ type: "typing", chat_id: "n", user_id: "zoe", active: true,
        expires_in_ms: 5000 });
    changed = new Set();
    ws.receive({ type: "blocked", data: ["mallory", "zoe"], request_id: block });
    out.blocked = [client.blocked, client.isBlocked("zoe"), client.typists("n"), [...changed]];
    out.typingToBlocked = client.typing("n");
    ws.receive({ type: "blocked", data: ["mallory"] }); // unasked: another device unblocked
    out.unblockedElsewhere = client.isBlocked("zoe");
    client.unblockUser("mallory");
    out.unblockFrame = sent("unblock_user").map((frame) => frame.user_id);

    // A refused typing frame is not an error for the UI; typing in that chat pauses a while.
    out.typingAgain = client.typing("n");
    ws.receive({ type: "error", code: "forbidden", field: null,
        message: "a block is in place between you and this user",
        request_id: sent("typing").at(-1).request_id });
    await tick(220);
    out.refused = [events.has("error"), client.typing("n")];
    await tick(120);
    out.afterPause = client.typing("n");

    // A dropped connection: typists go (nobody can renew them), presence is asked again.
    ws.receive({ type: "typing", chat_id: "g", user_id: "hal", active: true,
        expires_in_ms: 5000 });
    const before = ws;
    ws.drop();
    out.afterDrop = [client.typists("g"), client.presence("zoe").lastSeen];
    await tick(30);
    ws = FakeSocket.last;
    await tick();
    ws.receive({ type: "authenticated", user_id: "ann" });
    ws.receive({ type: "all_chats", data: [...chats, direct("n", "zoe")],
        request_id: sent("fetch_chats")[0].request_id });
    out.rebind = [ws !== before, sent("fetch_blocked").length,
        sent("fetch_presence").map((frame) => frame.user_ids.length)];
    out.events = [...events].sort();
    client.stop();
    return out;
}"""


def test_chat_client_typing_presence_and_blocks_contract(open_page: Callable[..., Page]) -> None:
    """Typing, presence and blocks in chat-client.js against a scripted server: what goes out
    when, and what the model makes of `typing`, `presence` and `blocked` frames."""
    out = open_page().evaluate(LIVE_CONTRACT_JS)
    assert out["onBind"] == [1, 1, 0]  # presence waits for the chat list
    assert out["asked"] == [200, 50]  # every direct chat's other side, 200 a frame
    assert out["groupAsked"] is False
    assert out["newChatAsked"] == ["zoe"]  # a new chat: its other side at once
    assert out["askedOnce"] == 3  # the same list again asks nobody again
    assert out["presence"] == [
        {"online": True, "lastSeen": None},
        {"online": False, "lastSeen": "2024-01-02T03:04:05.678Z"},
        None,
    ]
    assert out["presenceLive"] == [
        {"online": False, "lastSeen": "2024-01-03T00:00:00.000Z"},
        ["n"],  # the direct chat with zoe changed
    ]
    assert out["typingCalls"] == [True, False, True, True, False]
    assert out["typingFrames"] == [["n", True], ["n", True], ["n", False]]
    assert out["typists"] == [
        ["gus", "hal"],
        ["gus", "hal"],
        ["hal"],
        ["g"],  # an expiry is a change of that chat
        [],  # hal's message arrived
        ["zoe"],
        [],  # active: false
    ]
    assert out["blockFrame"] == [["zoe", True]]
    assert out["blocked"] == [["mallory", "zoe"], True, [], ["n"]]
    assert out["typingToBlocked"] is False
    assert out["unblockedElsewhere"] is False
    assert out["unblockFrame"] == ["mallory"]
    assert out["typingAgain"] is True
    assert out["refused"] == [False, False]  # no error event; paused
    assert out["afterPause"] is True
    assert out["afterDrop"] == [[], "2024-01-03T00:00:00.000Z"]  # the last known stays
    assert out["rebind"] == [True, 1, [200, 51]]
    assert out["events"] == ["blocked", "presence", "typing"]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HandlerProcess]:
    """A handler that says a user is offline half a second after their last connection went."""
    handler = HandlerProcess(
        tmp_path_factory.mktemp("live"),
        extra={"limits": {"presence_grace_s": PRESENCE_GRACE_S}},
    )
    handler.start()
    yield handler
    handler.stop()


@pytest.fixture
def open_live_page(browser: Browser, live_server: HandlerProcess) -> Iterator[Callable[..., Page]]:
    yield from page_opener(browser, live_server.url)


def header_status(page: Page) -> Any:
    """The line under the chat's name: typing, presence (direct chats) or members (groups)."""
    return page.locator("#conversation-status")


def preview(page: Page, name: str) -> Any:
    return chat_item(page, name).locator(".chat-preview")


def online_dot(page: Page, name: str) -> Any:
    return chat_item(page, name).locator(".avatar.online")


def composer_box(page: Page) -> Any:
    return page.get_by_label("Message", exact=True)


def frame_order(page: Page) -> list[str]:
    """The raw frame log as "in:type" / "out:type", oldest first."""
    return list(
        page.evaluate(
            """() => [...document.querySelectorAll("#frame-list li")]
                .map((item) => `${item.dataset.direction}:${item.dataset.type}`)"""
        )
    )


def test_typing_shows_in_the_header_and_the_list_until_sent_cleared_or_expired(
    open_live_page: Callable[..., Page],
) -> None:
    alice = sign_in(open_live_page(), "alice")
    carol = sign_in(open_live_page(), "carol")
    start_chat(carol, "alice")
    send(carol, "Are we still on for tonight?")
    carol.close()  # carol is gone: her row has no dot
    bob = sign_in(open_live_page(), "bob")
    start_chat(alice, "bob")
    send(alice, "Hi Bob!")
    chat_item(bob, "alice").click()
    expect(bubbles(bob)).to_have_text(["Hi Bob!"])
    expect(header_status(alice)).to_have_text("online")

    box = composer_box(bob)
    box.press_sequentially("On my way", delay=40)
    typing = f"bob is typing{TYPING}"
    expect(header_status(alice)).to_have_text(typing)  # in place of "online"
    expect(header_status(alice)).to_have_class(re.compile(r"\btyping\b"))
    expect(preview(alice, "bob")).to_have_text(typing)  # in place of "You: Hi Bob!"
    expect(preview(alice, "bob")).to_have_class(re.compile(r"\btyping\b"))
    expect(online_dot(alice, "bob")).to_have_count(1)
    expect(online_dot(alice, "carol")).to_have_count(0)
    expect(preview(alice, "carol")).to_have_text("Are we still on for tonight?")
    # Nine key presses within a second: one `typing` on the wire (renewed every 3 s).
    expect(logged(bob, "out", "typing")).to_have_count(1)
    expect(logged(bob, "out", "typing")).to_contain_text('"active": true')
    save_screenshot(alice.screenshot(), "screenshot-web-presence.png", docs=True)

    # Sent: the indicator goes with the message (and bob's client says it stopped).
    box.press("Enter")
    expect(bubbles(alice)).to_have_text(["Hi Bob!", "On my way"])
    expect(header_status(alice)).to_have_text("online")
    expect(preview(alice, "bob")).to_have_text("On my way")
    expect(preview(alice, "bob")).not_to_have_class(re.compile(r"\btyping\b"))
    expect(logged(bob, "out", "typing").last).to_contain_text('"active": false')

    # Cleared composer: stopped at once.
    box.press_sequentially("wait")
    expect(header_status(alice)).to_have_text(typing)
    box.fill("")
    expect(logged(bob, "out", "typing")).to_have_count(4)
    expect(logged(bob, "out", "typing").last).to_contain_text('"active": false')
    expect(header_status(alice)).to_have_text("online", timeout=3_000)  # long before 6 s

    # Switching to another chat stops it too.
    box.press_sequentially("Hold on")
    expect(header_status(alice)).to_have_text(typing)
    start_chat(bob, "dave")
    expect(bob.locator("#conversation-title")).to_have_text("dave")
    expect(logged(bob, "out", "typing").last).to_contain_text('"active": false')
    expect(header_status(alice)).to_have_text("online", timeout=3_000)

    # Left alone with text in the composer, the indicator lasts its expires_in_ms (6 s).
    chat_item(bob, "alice").click()
    expect(box).to_have_value("Hold on")  # the draft came back
    box.press_sequentially(", almost")
    expect(header_status(alice)).to_have_text(typing)
    typed = time.monotonic()
    expect(header_status(alice)).to_have_text("online", timeout=10_000)
    assert time.monotonic() - typed > 3  # it expired: nothing said it stopped
    expect(logged(bob, "out", "typing")).to_have_count(7)  # no `false` for the expiry
    expect(logged(bob, "out", "typing").last).to_contain_text('"active": true')
    expect(preview(alice, "bob")).to_have_text("On my way")


def test_typing_in_a_group_names_everyone_who_types(open_live_page: Callable[..., Page]) -> None:
    erin = sign_in(open_live_page(PHONE), "erin")
    carl = sign_in(open_live_page(), "carl")
    dina = sign_in(open_live_page(), "dina")
    create_group(carl, "Band practice", "dina, erin")
    send(carl, "Saturday at 4?")
    chat_item(dina, "Band practice").click()
    row = preview(erin, "Band practice")
    expect(row).to_have_text("carl: Saturday at 4?")

    composer_box(carl).press_sequentially("Or 5")
    expect(row).to_have_text(f"carl is typing{TYPING}")
    composer_box(dina).press_sequentially("4 is fine")
    both = f"carl and dina are typing{TYPING}"
    expect(row).to_have_text(both)
    expect(erin.locator(".chat-item .avatar.online")).to_have_count(0)  # no dot for a group
    save_screenshot(erin.screenshot(), "screenshot-web-phone-typing.png", docs=True)

    chat_item(erin, "Band practice").click()
    expect(header_status(erin)).to_have_text(both)
    expect(erin.locator("#conversation-id")).to_be_hidden()  # "3 members" gives way
    composer_box(carl).press("Enter")
    expect(bubbles(erin)).to_have_text(["Saturday at 4?", "Or 5"])
    expect(header_status(erin)).to_have_text(f"dina is typing{TYPING}")
    composer_box(dina).press("Enter")
    expect(header_status(erin)).to_be_hidden()
    expect(erin.locator("#conversation-id")).to_have_text("3 members")
    expect(erin.locator("#conversation-id")).to_be_visible()


def test_presence_dot_and_last_seen_follow_the_other_side(
    open_live_page: Callable[..., Page],
) -> None:
    fay = sign_in(open_live_page(fake_clock=True), "fay")
    fay_phone = sign_in(open_live_page(PHONE), "fay")
    gus = sign_in(open_live_page(), "gus")
    start_chat(fay, "gus")
    expect(fay.locator("#conversation-title")).to_have_text("gus")
    # The new chat's other side was asked about at once.
    expect(logged(fay, "out", "fetch_presence").last).to_contain_text('"gus"')
    expect(online_dot(fay, "gus")).to_have_count(1)
    expect(fay.locator("#conversation-avatar")).to_have_class(re.compile(r"\bonline\b"))
    expect(header_status(fay)).to_have_text("online")
    expect(header_status(fay)).to_have_class(re.compile(r"\bonline\b"))
    expect(online_dot(fay_phone, "gus")).to_have_count(1)  # live, on the other device too
    send(fay, "Lunch tomorrow?")
    chat_item(gus, "fay").click()
    send(gus, "Sure, 1 pm at the usual place")
    expect(bubbles(fay)).to_have_text(["Lunch tomorrow?", "Sure, 1 pm at the usual place"])

    gus.close()  # after the grace, every device of fay's is told
    expect(header_status(fay)).to_have_text("last seen just now")
    expect(online_dot(fay, "gus")).to_have_count(0)
    expect(fay.locator("#conversation-avatar")).not_to_have_class(re.compile(r"\bonline\b"))
    expect(online_dot(fay_phone, "gus")).to_have_count(0)
    # As time passes the line ages with it, without any frame.
    fay.clock.fast_forward("05:00")
    expect(header_status(fay)).to_have_text("last seen 5 minutes ago")
    chat_item(fay_phone, "gus").click()
    expect(header_status(fay_phone)).to_have_text("last seen just now")
    save_screenshot(fay_phone.screenshot(), "screenshot-web-phone-presence.png", docs=True)

    # A fresh page asks: fetch_presence with the direct chats' user_ids, once the list is in.
    fay_phone.reload()
    expect(fay_phone.locator("#connection")).to_have_text("Online")
    expect(header_status(fay_phone)).to_have_text("last seen just now")
    order = frame_order(fay_phone)
    assert order.index("in:all_chats") < order.index("out:fetch_presence")
    expect(logged(fay_phone, "out", "fetch_presence")).to_contain_text('"user_ids"')

    # gus is back: live, and the dot returns.
    sign_in(open_live_page(), "gus")
    for page in (fay, fay_phone):
        expect(header_status(page)).to_have_text("online")
    expect(online_dot(fay, "gus")).to_have_count(1)


def test_last_seen_reads_like_a_messenger(open_live_page: Callable[..., Page]) -> None:
    sockets: list[WebSocketRoute] = []

    def keep(ws: WebSocketRoute) -> None:
        ws.connect_to_server()  # frames pass through both ways
        sockets.append(ws)

    hal = sign_in(open_live_page(route=keep, locale="en-GB", timezone_id="UTC"), "hal")
    start_chat(hal, "ida")  # ida never connected: nothing to say about her
    expect(hal.locator("#conversation-title")).to_have_text("ida")
    expect(logged(hal, "in", "presence")).to_have_count(1)
    expect(header_status(hal)).to_be_hidden()

    def seen(at: datetime | None, *, online: bool = False) -> None:
        stamp = None if at is None else at.isoformat(timespec="milliseconds")
        entry = {"user_id": "ida", "online": online, "last_seen": stamp}
        sockets[-1].send(json.dumps({"type": "presence", "data": [entry]}))

    now = datetime.now(UTC)
    two_hours_ago = now - timedelta(hours=2)
    day = "today" if two_hours_ago.date() == now.date() else "yesterday"
    seen(two_hours_ago)
    expect(header_status(hal)).to_have_text(f"last seen {day} at {two_hours_ago:%H:%M}")
    yesterday = (now - timedelta(days=1)).replace(hour=9, minute=12)
    seen(yesterday)
    expect(header_status(hal)).to_have_text("last seen yesterday at 09:12")
    last_year = now.replace(year=now.year - 1, month=12, day=2)
    seen(last_year)
    expect(header_status(hal)).to_have_text(f"last seen 2 Dec {now.year - 1}")
    if now.timetuple().tm_yday > 2:  # the 1st of January is not today or yesterday
        seen(now.replace(month=1, day=1))
        expect(header_status(hal)).to_have_text("last seen 1 Jan")
    seen(now - timedelta(minutes=1, seconds=5))
    expect(header_status(hal)).to_have_text("last seen 1 minute ago")
    seen(None, online=True)
    expect(header_status(hal)).to_have_text("online")
    expect(online_dot(hal, "ida")).to_have_count(1)
    seen(None)  # what a stranger, or someone across a block, is told
    expect(header_status(hal)).to_be_hidden()
    expect(online_dot(hal, "ida")).to_have_count(0)


def test_blocking_replaces_the_composer_and_a_blocked_send_is_explained(
    open_live_page: Callable[..., Page],
) -> None:
    jan = sign_in(open_live_page(), "jan")
    jan_phone = sign_in(open_live_page(PHONE), "jan")
    kai = sign_in(open_live_page(), "kai")
    start_chat(jan, "kai")
    send(jan, "Hi Kai")
    chat_item(kai, "jan").click()
    chat_item(jan_phone, "kai").click()
    expect(bubbles(kai)).to_have_text(["Hi Kai"])
    expect(header_status(jan)).to_have_text("online")
    expect(logged(jan, "out", "fetch_blocked")).to_have_count(1)  # asked after binding

    jan.get_by_role("button", name="Chat menu").click()
    jan.get_by_role("menuitem", name="Block user", exact=True).click()
    confirm = jan.locator("#group-confirm")
    expect(confirm).to_contain_text("Block kai?")
    confirm.get_by_role("button", name="Block").click()
    bar = jan.locator("#blocked-bar")
    expect(bar).to_be_visible()
    expect(bar.locator("#blocked-text")).to_have_text("You blocked kai. Unblock to send messages.")
    expect(composer_box(jan)).to_be_hidden()
    expect(composer_box(jan)).to_be_disabled()
    expect(jan.locator("#send-button")).to_be_hidden()
    expect(logged(jan, "in", "blocked").last).to_contain_text('"kai"')
    # No presence across a block: no dot, no line (kai is still online).
    expect(header_status(jan)).to_be_hidden()
    expect(jan.locator("#conversation-avatar")).not_to_have_class(re.compile(r"\bonline\b"))
    expect(online_dot(jan, "kai")).to_have_count(0)
    # The other device follows without asking, and so does the chat menu.
    expect(jan_phone.locator("#blocked-bar")).to_be_visible()
    expect(logged(jan_phone, "out", "block_user")).to_have_count(0)
    jan.get_by_role("button", name="Chat menu").click()
    expect(jan.get_by_role("menuitem", name="Unblock user", exact=True)).to_be_visible()
    expect(jan.get_by_role("menuitem", name="Block user", exact=True)).to_be_hidden()
    jan.mouse.move(0, 0)
    save_screenshot(jan.screenshot(), "screenshot-web-blocked.png", docs=True)
    jan.keyboard.press("Escape")
    expect(jan.locator("#chat-menu")).to_be_hidden()

    # kai cannot tell from his screen, until he sends: then he is told, clearly.
    expect(header_status(kai)).to_be_hidden()  # jan's presence is hidden from him
    box = composer_box(kai)
    box.press_sequentially("Jan?")
    expect(logged(kai, "in", "error")).to_have_count(1)  # the typing frame was refused...
    expect(kai.locator(".toast")).to_have_count(0)  # ...which is nothing to show
    expect(header_status(jan)).to_be_hidden()  # and jan sees no typing
    box.press("Enter")
    toast = kai.locator('.toast[data-reason="blocked"]')
    expect(toast).to_contain_text("Message not sent")
    expect(toast).to_contain_text("jan has blocked you")
    failed = kai.locator('.bubble.own[data-state="failed"]')
    expect(failed.locator(".failure")).to_contain_text("Not sent: jan has blocked you")
    save_screenshot(kai.screenshot(), "screenshot-web-blocked-sender.png", docs=True)
    expect(bubbles(jan)).to_have_text(["Hi Kai"])  # nothing reached jan

    # Unblocked from the bar: the composer is back (focused), so is presence, everywhere.
    bar.get_by_role("button", name="Unblock").click()
    expect(bar).to_be_hidden()
    expect(composer_box(jan)).to_be_enabled()
    expect(composer_box(jan)).to_be_focused()
    expect(jan_phone.locator("#blocked-bar")).to_be_hidden()
    expect(header_status(jan)).to_have_text("online")
    expect(header_status(kai)).to_have_text("online")
    failed.get_by_role("button", name="Retry").click()
    expect(bubbles(jan)).to_have_text(["Hi Kai", "Jan?"])
    send(jan, "Sorry, wrong button!")
    expect(bubbles(kai)).to_have_text(["Hi Kai", "Jan?", "Sorry, wrong button!"])
