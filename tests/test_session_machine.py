"""Table tests of the pure session machine: the binding rule, marks, deadlines, limits.

No sockets, no sleeps, no trio: each test feeds events with explicit times and checks the
commands. The end-to-end suites check the same rules through a real server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from handler import protocol
from handler.auth import Identity
from handler.errors import CloseCode, ConnectionLimitReached, ErrorCode, ProtocolError
from handler.ratelimit import TokenBucket
from handler.session import events as ev
from handler.session.machine import (
    BACKLOG_MEMORY_S,
    SessionMachine,
    SessionRules,
    State,
    internal_error,
)
from handler.session.outgoing import Outgoing, Receipt
from handler.store.base import BacklogPlan

WALL0 = 1_700_000_000.0
RULES = SessionRules(
    auth_timeout_s=10.0, idle_timeout_s=60.0, rate_per_s=20.0, rate_burst=40, park_capacity=4
)


def at(t: float) -> ev.Instant:
    """Monotonic time `t`; the wall clock runs alongside from WALL0."""
    return ev.Instant(t, WALL0 + t)


def verify(token: str, wall: float) -> Identity:
    """Tokens in these tests are "user" or "user@exp" (exp as wall-clock seconds)."""
    user, _, exp = token.partition("@")
    if user == "bad":
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "invalid token: bad", field="token")
    expires = float(exp) if exp else None
    if expires is not None and expires <= wall:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "invalid token: expired", field="token")
    return Identity(user, expires)


def machine(rules: SessionRules = RULES) -> SessionMachine:
    return SessionMachine(rules, verify, at(0))


def chat(chat_id: str, a: str = "alice", b: str = "bob") -> protocol.Chat:
    return protocol.Chat(chat_id, tuple(sorted((a, b))), a, "2026-01-01T00:00:00.000Z")


def message(message_id: str, chat_id: str = "1", sender: str = "bob") -> protocol.Message:
    recipient = "alice" if sender == "bob" else "bob"
    return protocol.Message(
        message_id, chat_id, sender, recipient, f"m{message_id}", "2026-01-01T00:00:00.000Z"
    )


def fan_out(message_id: str | None, chat_id: str = "1") -> Outgoing:
    text = f"live {chat_id}/{message_id}"
    kind = "message" if message_id is not None else "new_chats"
    return Outgoing(text, kind, None, 0.0, message_id=message_id, chat_id=chat_id)


def frame(obj: dict[str, Any]) -> ev.FrameReceived:
    return ev.FrameReceived(protocol.decode(json.dumps(obj)))


def types(commands: list[ev.Command]) -> list[str]:
    """A readable digest: command class, plus the frame type of replies."""
    out = []
    for command in commands:
        if isinstance(command, ev.Reply):
            out.append(f"Reply:{command.frame_type}")
        else:
            out.append(type(command).__name__)
    return out


def error_code(command: ev.Command) -> ErrorCode:
    assert isinstance(command, ev.Reply)
    assert isinstance(command.frame, protocol.ErrorFrame)
    return command.frame.code


PLAN = BacklogPlan(
    chats=(chat("2", "carol", "alice"),),
    message_chats=(("1", "5"),),
    high_water={"1": "7", "2": "0"},
)


def bind(m: SessionMachine, token: str = "alice", plan: BacklogPlan = PLAN, t: float = 1.0) -> None:
    """Drive a binding through to BOUND with the plan's backlog: chat 1 holds 5..7."""
    assert types(m.handle(ev.Opened(token), at(t))) == ["Subscribe"]
    m.handle(ev.Subscribed(plan, TokenBucket(20.0, 40)), at(t))
    for chat_id, _ in plan.message_chats:
        m.handle(ev.BacklogRead(chat_id, ()), at(t))
    assert m.handle(ev.Replayed(), at(t)) == []
    assert m.state is State.BOUND


# --------------------------------------------------------------------------- binding


def test_binding_sends_authenticated_then_backlog_chat_by_chat_then_replays() -> None:
    m = machine()
    assert m.handle(ev.Opened("alice"), at(1)) == [ev.Subscribe(Identity("alice", None))]
    assert m.state is State.BINDING
    commands = m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert types(commands) == ["Reply:authenticated", "Reply:new_chats", "ReadBacklog"]
    assert commands[1] == ev.Reply(
        protocol.NewChats(PLAN.chats), "new_chats", Receipt("alice", chat_ids=("2",))
    )
    # Each chat's undelivered messages are read only up to the snapshot's mark.
    assert commands[2] == ev.ReadBacklog("alice", "1", "5", "7")
    backlog = (message("5"), message("7"))
    commands = m.handle(ev.BacklogRead("1", backlog), at(1))
    assert types(commands) == ["Reply:new_messages", "Replay"]
    assert commands[0] == ev.Reply(
        protocol.NewMessages("1", backlog), "new_messages", Receipt("alice", message_ids=("5", "7"))
    )
    assert m.handle(ev.Replayed(), at(1)) == []
    assert m.state is State.BOUND


# The binding race, as a table: fan-out that arrives while binding is parked, then replayed
# only if the snapshot did not cover it; after binding, the same rule applies live.
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (fan_out("6"), False),  # at or below chat 1's mark 7: in the backlog or delivered
        (fan_out("7"), False),
        (fan_out("8"), True),  # committed after the snapshot: only fan-out carries it
        (fan_out(None, "2"), False),  # chat 2 is in the snapshot (new_chats or delivered)
        (fan_out(None, "9"), True),  # a chat created after the snapshot
        (fan_out("1", "9"), True),  # a message of that new chat
    ],
)
def test_binding_race_parked_and_live(item: Outgoing, expected: bool) -> None:
    # Parked while binding, replayed after the backlog.
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    assert m.handle(ev.FanOut(item), at(1)) == []  # parked, never sent before the backlog
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    commands = m.handle(ev.BacklogRead("1", (message("5"),)), at(1))
    replayed = [c for c in commands if isinstance(c, ev.Write)]
    assert replayed == ([ev.Write(item)] if expected else [])
    assert types(commands)[-1] == "Replay"
    # Live, once bound: the same decision, without waiting (a Push).
    m.handle(ev.Replayed(), at(1))
    assert m.handle(ev.FanOut(item), at(2)) == ([ev.Push(item)] if expected else [])


def test_parked_items_keep_their_order_and_late_ones_are_replayed_next() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    first, second, third = fan_out("8"), fan_out("9"), fan_out("10")
    m.handle(ev.FanOut(first), at(1))
    m.handle(ev.FanOut(second), at(1))
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    commands = m.handle(ev.BacklogRead("1", ()), at(1))
    assert commands == [ev.Write(first), ev.Write(second), ev.Replay()]
    # Arrives while the replay is being written: parked, never pushed ahead of it.
    assert m.handle(ev.FanOut(third), at(1)) == []
    assert m.handle(ev.Replayed(), at(1)) == [ev.Write(third), ev.Replay()]
    assert m.state is State.BINDING
    assert m.handle(ev.Replayed(), at(1)) == []
    assert m.state is State.BOUND


def test_parking_is_bounded_by_the_outbox_capacity() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    for n in range(RULES.park_capacity):
        assert m.handle(ev.FanOut(fan_out(str(10 + n))), at(1)) == []
    assert m.handle(ev.FanOut(fan_out("99")), at(1)) == [ev.DropSlow()]


def test_snapshot_marks_are_forgotten_after_the_backlog_memory() -> None:
    m = machine()
    bind(m, t=1.0)
    covered = fan_out("6")
    assert m.handle(ev.FanOut(covered), at(1 + BACKLOG_MEMORY_S - 0.001)) == []
    # Long after the binding, late fan-out cannot be a duplicate any more.
    assert m.handle(ev.FanOut(covered), at(1 + BACKLOG_MEMORY_S + 0.001)) == [ev.Push(covered)]


def test_late_fan_out_for_a_failed_binding_is_ignored() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    commands = m.handle(ev.SubscribeFailed(RuntimeError("bus down")), at(1))
    assert types(commands) == ["Unsubscribe", "ReportInternal"]
    assert m.state is State.UNBOUND
    assert m.user_id is None
    assert m.handle(ev.FanOut(fan_out("8")), at(1)) == []


def test_the_frame_that_carried_the_token_is_answered_after_the_backlog() -> None:
    m = machine()
    commands = m.handle(frame({"type": "ping", "token": "alice", "request_id": 7}), at(1))
    assert types(commands) == ["Subscribe"]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    assert m.handle(ev.Replayed(), at(1)) == [ev.Reply(protocol.Pong(7), "pong")]


def test_too_many_connections_is_answered_then_closed() -> None:
    m = machine()
    m.handle(frame({"type": "ping", "token": "alice", "request_id": "r"}), at(1))
    commands = m.handle(ev.SubscribeFailed(ConnectionLimitReached(10)), at(1))
    assert types(commands) == ["Unsubscribe", "Reply:error", "CloseWhenWritten"]
    assert error_code(commands[1]) is ErrorCode.RATE_LIMITED
    assert isinstance(commands[1], ev.Reply)
    assert commands[1].frame.request_id == "r"
    assert commands[2] == ev.CloseWhenWritten(CloseCode.POLICY_VIOLATION, "too many connections")


def test_a_failed_backlog_read_unbinds_and_closes_1011() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    commands = m.handle(ev.BacklogFailed(RuntimeError("disk")), at(1))
    assert types(commands) == ["Unsubscribe", "ReportInternal", "Close"]
    assert commands[2] == ev.Close(CloseCode.INTERNAL_ERROR, "backlog unavailable; reconnect")
    assert m.state is State.UNBOUND


# --------------------------------------------------------------------------- authentication


def test_unbound_serves_ping_and_refuses_everything_else() -> None:
    m = machine()
    assert m.handle(frame({"type": "ping"}), at(1)) == [ev.Reply(protocol.Pong(), "pong")]
    commands = m.handle(frame({"type": "fetch_chats", "request_id": 3}), at(1))
    assert error_code(commands[0]) is ErrorCode.UNAUTHORIZED
    assert isinstance(commands[0], ev.Reply)
    assert commands[0].frame.request_id == 3


def test_an_invalid_query_token_leaves_the_connection_open_and_unbound() -> None:
    m = machine()
    commands = m.handle(ev.Opened("bad"), at(1))
    assert [error_code(c) for c in commands] == [ErrorCode.UNAUTHORIZED]
    assert m.state is State.UNBOUND


def test_a_token_for_another_user_is_forbidden_and_changes_nothing() -> None:
    m = machine()
    bind(m)
    commands = m.handle(frame({"type": "ping", "token": "mallory"}), at(2))
    assert [error_code(c) for c in commands] == [ErrorCode.FORBIDDEN]
    assert m.user_id == "alice"


@pytest.mark.parametrize(
    ("events", "close_at", "expected"),
    [
        # Token expiry closes 1008 at exp, converted from the wall clock to the monotonic one.
        ([], 99.9, []),
        ([], 100.0, [ev.Close(CloseCode.POLICY_VIOLATION, "token expired")]),
        # An in-band refresh with a later exp extends the connection's life...
        (["alice@" + str(WALL0 + 200)], 150.0, []),
        (
            ["alice@" + str(WALL0 + 200)],
            200.0,
            [ev.Close(CloseCode.POLICY_VIOLATION, "token expired")],
        ),
        # ...and an earlier one never shortens it.
        (
            ["alice@" + str(WALL0 + 50)],
            100.0,
            [ev.Close(CloseCode.POLICY_VIOLATION, "token expired")],
        ),
    ],
)
def test_token_expiry_and_in_band_refresh(
    events: list[str], close_at: float, expected: list[ev.Command]
) -> None:
    m = machine(SessionRules(10.0, 1000.0, 20.0, 40, 4))
    bind(m, token=f"alice@{WALL0 + 100}", t=1.0)
    for token in events:
        assert m.handle(frame({"type": "ping", "token": token}), at(10)) == [
            ev.Reply(protocol.Pong(), "pong")
        ]
    assert m.handle(ev.DeadlineReached(), at(close_at)) == expected


def test_the_same_token_after_its_expiry_is_unauthorized() -> None:
    m = machine(SessionRules(10.0, 1000.0, 20.0, 40, 4))
    token = f"alice@{WALL0 + 100}"
    bind(m, token=token)
    commands = m.handle(frame({"type": "ping", "token": token}), at(100))
    assert [error_code(c) for c in commands] == [ErrorCode.UNAUTHORIZED]


@pytest.mark.parametrize(
    ("bound", "now", "expected"),
    [
        (False, 9.99, []),
        (False, 10.0, [ev.Close(CloseCode.POLICY_VIOLATION, "not authenticated in time")]),
        (True, 10.0, []),  # bound in time: the authentication deadline is gone
        (
            True,
            61.0,
            [ev.Close(CloseCode.POLICY_VIOLATION, "idle timeout: send ping to stay connected")],
        ),
    ],
)
def test_authentication_and_idle_deadlines(
    bound: bool, now: float, expected: list[ev.Command]
) -> None:
    m = machine()
    if bound:
        bind(m, t=1.0)
    assert m.next_deadline() == (60.0 if bound else 10.0)
    assert m.handle(ev.DeadlineReached(), at(now)) == expected


def test_any_data_frame_moves_the_idle_deadline() -> None:
    m = machine()
    bind(m)
    m.handle(frame({"type": "ping"}), at(50))
    assert m.next_deadline() == 110.0
    assert m.handle(ev.DeadlineReached(), at(100)) == []


# --------------------------------------------------------------------------- limits and requests


def test_rate_limit_counts_every_frame_even_invalid_ones() -> None:
    m = machine(SessionRules(10.0, 60.0, 1.0, 2, 4))
    bad = ev.FrameReceived(None, ProtocolError(ErrorCode.BAD_JSON, "not json"))
    assert [error_code(c) for c in m.handle(bad, at(1))] == [ErrorCode.BAD_JSON]
    assert [error_code(c) for c in m.handle(bad, at(1))] == [ErrorCode.BAD_JSON]
    commands = m.handle(frame({"type": "ping", "request_id": 1}), at(1))
    assert [error_code(c) for c in commands] == [ErrorCode.RATE_LIMITED]
    assert isinstance(commands[0], ev.Reply)
    assert commands[0].frame.retry_after_ms == 1000


def test_a_bound_connection_shares_its_users_bucket() -> None:
    m = machine()
    shared = TokenBucket(1.0, 1)
    m.handle(ev.Opened("alice"), at(1))
    m.handle(ev.Subscribed(PLAN, shared), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    m.handle(ev.Replayed(), at(1))
    shared.take(1.0)  # another connection of the user spent the token
    commands = m.handle(frame({"type": "ping"}), at(1))
    assert [error_code(c) for c in commands] == [ErrorCode.RATE_LIMITED]


def test_send_message_checks_the_chat_then_stores_and_replies_only_to_resends() -> None:
    m = machine()
    bind(m)
    send = {"type": "send_message", "chat_id": "1", "recipient_id": "bob", "content": "hi"}
    (load,) = m.handle(frame({**send, "request_id": 1}), at(2))
    assert isinstance(load, ev.LoadChat)
    (store,) = m.handle(ev.ChatLoaded(load.frame, chat("1")), at(2))
    assert store == ev.StoreMessage(load.frame, chat("1"), "alice")
    stored = message("9", sender="alice")
    assert m.handle(ev.MessageStored(load.frame, stored, True), at(2)) == []  # ack is fan-out
    assert m.handle(ev.MessageStored(load.frame, stored, False), at(2)) == [
        ev.Reply(protocol.MessageEvent(stored, 1), "message")
    ]


@pytest.mark.parametrize(
    ("loaded", "recipient", "code", "field"),
    [
        (None, "bob", ErrorCode.NOT_FOUND, "chat_id"),
        (chat("1", "carol", "dave"), "bob", ErrorCode.FORBIDDEN, "chat_id"),
        (chat("1"), "carol", ErrorCode.BAD_REQUEST, "recipient_id"),
    ],
)
def test_send_message_refusals(
    loaded: protocol.Chat | None, recipient: str, code: ErrorCode, field: str
) -> None:
    m = machine()
    bind(m)
    send = {"type": "send_message", "chat_id": "1", "recipient_id": recipient, "content": "x"}
    (load,) = m.handle(frame({**send, "request_id": "q"}), at(2))
    assert isinstance(load, ev.LoadChat)
    (reply,) = m.handle(ev.ChatLoaded(load.frame, loaded), at(2))
    assert isinstance(reply, ev.Reply)
    assert isinstance(reply.frame, protocol.ErrorFrame)
    assert (reply.frame.code, reply.frame.field, reply.frame.request_id) == (code, field, "q")


def test_fetch_chats_streams_one_answer_at_a_time() -> None:
    m = machine()
    bind(m)
    (listing,) = m.handle(frame({"type": "fetch_chats", "limit": 5}), at(2))
    assert isinstance(listing, ev.ListChats)
    chats = (chat("1"), chat("2", "carol", "alice"))
    commands = m.handle(ev.ChatsListed(listing.frame, chats), at(2))
    assert types(commands) == ["Reply:all_chats", "StreamHistories"]
    assert commands[1] == ev.StreamHistories(listing.frame, ("1", "2"))
    # A second fetch while the first is streaming is refused with a retry hint.
    refused = m.handle(frame({"type": "fetch_chats", "request_id": 2}), at(2))
    assert [error_code(c) for c in refused] == [ErrorCode.RATE_LIMITED]
    page = (message("3"), message("4", sender="alice"))
    (reply,) = m.handle(ev.HistoryRead(listing.frame, "1", page, True), at(2))
    # What it returns counts as delivered: the messages addressed to the user.
    assert isinstance(reply, ev.Reply)
    assert reply.receipt == Receipt("alice", message_ids=("3",))
    assert m.handle(ev.HistoryDone(listing.frame), at(2)) == []
    (again,) = m.handle(frame({"type": "fetch_chats"}), at(2))
    assert isinstance(again, ev.ListChats)


def test_a_store_fault_answers_internal_and_a_protocol_error_answers_itself() -> None:
    m = machine()
    bind(m)
    (load,) = m.handle(frame({"type": "fetch_messages", "chat_id": "1", "request_id": 4}), at(2))
    assert isinstance(load, ev.LoadChat)
    fault = RuntimeError("boom")
    assert m.handle(ev.RequestFailed(load.frame, fault), at(2)) == [ev.ReportInternal(fault, 4)]
    refusal = ProtocolError(ErrorCode.NOT_FOUND, "no such chat", field="chat_id")
    commands = m.handle(ev.RequestFailed(load.frame, refusal), at(2))
    assert [error_code(c) for c in commands] == [ErrorCode.NOT_FOUND]


def test_internal_error_quotes_the_correlation_id() -> None:
    frame_ = internal_error("abc123", 5)
    assert frame_.code is ErrorCode.INTERNAL
    assert "abc123" in frame_.message
    assert frame_.request_id == 5
