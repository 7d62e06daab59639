"""Table tests of the pure session machine: the binding rule, marks, deadlines, limits.

No sockets, no sleeps, no trio: each test feeds events with explicit times and checks the
commands. The end-to-end suites check the same rules through a real server.

In these tables a message's id, seq and version are the same number unless a row says
otherwise: every change of a chat (a new message, an edit, a delete) takes the chat's next
version, and the binding rule compares versions, never ids.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest

from handler import protocol
from handler.auth import Identity
from handler.errors import (
    CloseCode,
    ConnectionLimitReached,
    ErrorCode,
    ProtocolError,
    StoreUnavailable,
)
from handler.ratelimit import TokenBucket
from handler.session import events as ev
from handler.session.machine import (
    BACKLOG_MEMORY_S,
    SessionMachine,
    SessionRules,
    State,
    internal_error,
)
from handler.session.outgoing import MARK_ONLY, Outgoing, Receipt, SeqMark
from handler.store.base import BacklogPlan

WALL0 = 1_700_000_000.0
WHEN = "2026-01-01T00:00:00.000Z"
EDITED = "2026-01-01T00:05:00.000Z"
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
    return protocol.Chat(chat_id, tuple(sorted((a, b))), a, WHEN)


def view(chat_id: str, a: str = "alice", b: str = "bob") -> protocol.ChatView:
    return protocol.ChatView.fresh(chat(chat_id, a, b))


def message(
    message_id: str,
    chat_id: str = "1",
    sender: str = "bob",
    *,
    seq: int | None = None,
    version: int | None = None,
    edited: bool = False,
    deleted: bool = False,
) -> protocol.Message:
    """A message; its seq is its id and its version its seq, unless given."""
    recipient = "alice" if sender == "bob" else "bob"
    seq = int(message_id) if seq is None else seq
    return protocol.Message(
        message_id,
        chat_id,
        sender,
        recipient,
        "" if deleted else f"m{message_id}",
        WHEN,
        seq=seq,
        version=seq if version is None else version,
        edited_at=EDITED if edited or deleted else None,
        deleted=deleted,
    )


def fan_out(message_id: str | None, chat_id: str = "1", *, version: int | None = None) -> Outgoing:
    """The hub's item for a new message (version: its id unless given), or for a new chat."""
    if message_id is None:
        return Outgoing(f"live chat {chat_id}", "new_chats", None, 0.0, None, chat_id, 0)
    text = f"live {chat_id}/{message_id}"
    version = int(message_id) if version is None else version
    return Outgoing(text, "message", None, 0.0, message_id, chat_id, version)


def updated(message_id: str, version: int, chat_id: str = "1") -> Outgoing:
    """The hub's item for an edit or delete of `message_id` that took the chat's `version`."""
    text = f"live update {chat_id}/{message_id}@{version}"
    return Outgoing(text, "message_updated", None, 0.0, message_id, chat_id, version)


def receipt_item(seq: int = 1, chat_id: str | None = None) -> Outgoing:
    """The hub's item for a receipt: no version (no backlog ever carries one)."""
    return Outgoing(f"live receipt {seq}", "receipt", None, 0.0, None, chat_id, None)


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


def state_of(m: SessionMachine) -> State:
    """The machine's state, read afresh (no narrowing across the events in between)."""
    return m.state


def error_frame(command: ev.Command) -> protocol.ErrorFrame:
    assert isinstance(command, ev.Reply)
    assert isinstance(command.frame, protocol.ErrorFrame)
    return command.frame


def error_code(command: ev.Command) -> ErrorCode:
    assert isinstance(command, ev.Reply)
    assert isinstance(command.frame, protocol.ErrorFrame)
    return command.frame.code


def error_of(commands: list[ev.Command]) -> tuple[ErrorCode, str | None, protocol.RequestId | None]:
    """(code, field, request_id) of the one error reply."""
    (reply,) = commands
    assert isinstance(reply, ev.Reply)
    assert isinstance(reply.frame, protocol.ErrorFrame)
    return reply.frame.code, reply.frame.field, reply.frame.request_id


# Chat 1 holds seq 1..7 at version 7 in the snapshot; alice had it up to seq 4. Chat 2 is new.
PLAN = BacklogPlan(
    chats=(view("2", "carol", "alice"),),
    message_chats=(("1", 4),),
    high_water={"1": (7, 7), "2": (0, 0)},
)


def bind(m: SessionMachine, token: str = "alice", plan: BacklogPlan = PLAN, t: float = 1.0) -> None:
    """Drive a binding through to BOUND with an empty read of each chat of the plan."""
    assert types(m.handle(ev.Opened(token), at(t))) == ["Subscribe"]
    m.handle(ev.Subscribed(plan, TokenBucket(20.0, 40)), at(t))
    for chat_id, _ in plan.message_chats:
        m.handle(ev.BacklogRead(chat_id, ()), at(t))
    for chat_id, _, _ in plan.update_chats:
        m.handle(ev.UpdatesRead(chat_id, ()), at(t))
    assert m.handle(ev.Replayed(), at(t)) == []
    assert state_of(m) is State.BOUND


def start_binding(m: SessionMachine, plan: BacklogPlan = PLAN, t: float = 1.0) -> list[ev.Command]:
    m.handle(ev.Opened("alice"), at(t))
    return m.handle(ev.Subscribed(plan, TokenBucket(20.0, 40)), at(t))


# --------------------------------------------------------------------------- binding


def test_binding_sends_authenticated_then_backlog_chat_by_chat_then_replays() -> None:
    m = machine()
    assert m.handle(ev.Opened("alice"), at(1)) == [ev.Subscribe(Identity("alice", None))]
    assert state_of(m) is State.BINDING
    commands = m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert types(commands) == ["Reply:authenticated", "Reply:new_chats", "ReadBacklog"]
    assert commands[1] == ev.Reply(
        protocol.NewChats(PLAN.chats), "new_chats", Receipt("alice", chat_ids=("2",))
    )
    # Each chat's undelivered messages are read after the user's mark, up to the snapshot's.
    assert commands[2] == ev.ReadBacklog("alice", "1", 4, 7)
    backlog = (message("5"), message("7"))
    commands = m.handle(ev.BacklogRead("1", backlog), at(1))
    assert types(commands) == ["Reply:new_messages", "Replay"]
    # The frame delivers seq 5..7 and, with no updated_messages of the chat to follow, every
    # change of it up to the snapshot's version.
    assert commands[0] == ev.Reply(
        protocol.NewMessages("1", backlog),
        "new_messages",
        Receipt("alice", marks=(SeqMark("1", 7, "7", 7, first=5),)),
    )
    assert m.handle(ev.Replayed(), at(1)) == []
    assert state_of(m) is State.BOUND
    assert (m.backlog_chats, m.backlog_messages) == (1, 2)


def test_a_binding_with_nothing_to_send_goes_straight_to_the_replay() -> None:
    m = machine()
    plan = BacklogPlan(chats=(), message_chats=(), high_water={"1": (3, 5)})
    assert start_binding(m, plan) == [
        ev.Reply(protocol.Authenticated("alice"), "authenticated"),
        ev.Replay(),
    ]
    assert m.handle(ev.Replayed(), at(1)) == []
    assert state_of(m) is State.BOUND


# The binding race, as a table: fan-out that arrives while binding is parked, then replayed
# only if the snapshot did not cover it; after binding, the same rule applies live.
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (fan_out("6"), False),  # at or below chat 1's version 7: in the backlog or delivered
        (fan_out("7"), False),
        (fan_out("8"), True),  # committed after the snapshot: only fan-out carries it
        (fan_out(None, "2"), False),  # chat 2 is in the snapshot (new_chats or delivered)
        (fan_out(None, "9"), True),  # a chat created after the snapshot
        (fan_out("1", "9"), True),  # a message of that new chat
        # By version, not by id: ids are global, versions count a chat's changes.
        (fan_out("99", version=6), False),
        (fan_out("3", version=8), True),
        (updated("3", 7), False),  # an edit the snapshot saw: the backlog has its state
        (updated("3", 8), True),  # an edit after the snapshot
        (updated("1", 2, "9"), True),  # an edit in a chat created after the snapshot
        (receipt_item(), True),  # a receipt is never in a backlog
        (receipt_item(chat_id="1"), True),  # not even with a chat of the snapshot
    ],
    ids=[
        "message-below",
        "message-at",
        "message-above",
        "chat-of-snapshot",
        "chat-after",
        "message-of-new-chat",
        "big-id-low-version",
        "small-id-high-version",
        "update-at",
        "update-above",
        "update-of-new-chat",
        "receipt",
        "receipt-with-chat",
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
    assert state_of(m) is State.BINDING
    assert m.handle(ev.Replayed(), at(1)) == []
    assert state_of(m) is State.BOUND


def test_receipts_are_parked_while_binding_and_replayed_in_their_place() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    items = [receipt_item(3), fan_out("6"), updated("2", 8), receipt_item(4, "1")]
    for item in items:
        assert m.handle(ev.FanOut(item), at(1)) == []
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    commands = m.handle(ev.BacklogRead("1", ()), at(1))
    # Message 6 is covered by the snapshot; the receipts are not, whatever their chat.
    assert commands == [ev.Write(items[0]), ev.Write(items[2]), ev.Write(items[3]), ev.Replay()]
    # One that arrives while the replay is written is parked and replayed next, too.
    late = receipt_item(5)
    assert m.handle(ev.FanOut(late), at(1)) == []
    assert m.handle(ev.Replayed(), at(1)) == [ev.Write(late), ev.Replay()]
    assert m.handle(ev.Replayed(), at(1)) == []
    assert m.handle(ev.FanOut(receipt_item(6, "1")), at(2)) == [ev.Push(receipt_item(6, "1"))]


def test_parking_is_bounded_by_the_outbox_capacity() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    for n in range(RULES.park_capacity):
        assert m.handle(ev.FanOut(fan_out(str(10 + n))), at(1)) == []
    assert m.handle(ev.FanOut(receipt_item()), at(1)) == [ev.DropSlow()]  # receipts count too


def test_snapshot_marks_are_forgotten_after_the_backlog_memory() -> None:
    m = machine()
    bind(m, t=1.0)
    covered = fan_out("6")
    assert m.handle(ev.FanOut(covered), at(1 + BACKLOG_MEMORY_S - 0.001)) == []
    assert m.handle(ev.FanOut(updated("2", 7)), at(1 + BACKLOG_MEMORY_S - 0.001)) == []
    # Long after the binding, late fan-out cannot be a duplicate any more.
    assert m.handle(ev.FanOut(covered), at(1 + BACKLOG_MEMORY_S + 0.001)) == [ev.Push(covered)]
    assert m.handle(ev.FanOut(updated("2", 7)), at(1 + BACKLOG_MEMORY_S + 0.002)) == [
        ev.Push(updated("2", 7))
    ]


def test_late_fan_out_for_a_failed_binding_is_ignored() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    commands = m.handle(ev.SubscribeFailed(RuntimeError("bus down")), at(1))
    assert types(commands) == ["Unsubscribe", "ReportInternal"]
    assert state_of(m) is State.UNBOUND
    assert m.user_id is None
    assert m.handle(ev.FanOut(fan_out("8")), at(1)) == []
    assert m.handle(ev.FanOut(receipt_item()), at(1)) == []


def test_the_frame_that_carried_the_token_is_answered_after_the_backlog() -> None:
    m = machine()
    commands = m.handle(frame({"type": "ping", "token": "alice", "request_id": 7}), at(1))
    assert types(commands) == ["Subscribe"]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    assert m.handle(ev.Replayed(), at(1)) == [ev.Reply(protocol.Pong(7), "pong")]


def test_a_mark_read_that_carried_the_token_is_served_after_the_backlog() -> None:
    m = machine()
    mark = frame({"type": "mark_read", "chat_id": "1", "message_id": "5", "token": "alice"})
    assert types(m.handle(mark, at(1))) == ["Subscribe"]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    assert m.handle(ev.Replayed(), at(1)) == [ev.LoadChat(mark.frame)]  # type: ignore[arg-type]


def test_too_many_connections_is_answered_then_closed() -> None:
    m = machine()
    m.handle(frame({"type": "ping", "token": "alice", "request_id": "r"}), at(1))
    commands = m.handle(ev.SubscribeFailed(ConnectionLimitReached(10)), at(1))
    assert types(commands) == ["Unsubscribe", "Reply:error", "CloseWhenWritten"]
    assert error_code(commands[1]) is ErrorCode.RATE_LIMITED
    assert error_frame(commands[1]).request_id == "r"
    assert commands[2] == ev.CloseWhenWritten(CloseCode.POLICY_VIOLATION, "too many connections")


def test_a_failed_backlog_read_unbinds_and_closes_1011() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    commands = m.handle(ev.BacklogFailed(RuntimeError("disk")), at(1))
    assert types(commands) == ["Unsubscribe", "ReportInternal", "Close"]
    assert commands[2] == ev.Close(CloseCode.INTERNAL_ERROR, "backlog unavailable; reconnect")
    assert state_of(m) is State.UNBOUND


# --------------------------------------------------------------------------- binding: changes

# Chat 1: alice had seq 1..4 and the changes up to version 2; since then seq 5..7 came and
# messages she had were edited or deleted, up to version 12. Chat 3 is all new to her. Chat 4
# only had changes (version 15) to messages she had (up to seq 10). Chat 2 is a new chat.
PLAN_WITH_UPDATES = BacklogPlan(
    chats=(view("2", "carol", "alice"),),
    message_chats=(("1", 4), ("3", 0)),
    update_chats=(("1", 2, 4), ("4", 5, 10)),
    high_water={"1": (7, 12), "2": (0, 0), "3": (2, 2), "4": (10, 15)},
)


def test_binding_sends_new_messages_of_every_chat_then_their_updates() -> None:
    m = machine()
    commands = start_binding(m, PLAN_WITH_UPDATES)
    assert types(commands) == ["Reply:authenticated", "Reply:new_chats", "ReadBacklog"]
    assert commands[2] == ev.ReadBacklog("alice", "1", 4, 7)

    chat_1 = (message("5"), message("7", version=9))
    commands = m.handle(ev.BacklogRead("1", chat_1), at(1))
    # updated_messages of chat 1 follow: this frame does not cover the chat's changes.
    assert commands == [
        ev.Reply(
            protocol.NewMessages("1", chat_1),
            "new_messages",
            Receipt("alice", marks=(SeqMark("1", 7, "7", 0, first=5),)),
        ),
        ev.ReadBacklog("alice", "3", 0, 2),
    ]

    chat_3 = (message("31", "3", seq=1), message("32", "3", seq=2))
    commands = m.handle(ev.BacklogRead("3", chat_3), at(1))
    # No update of chat 3 follows: its new_messages covers every change up to the snapshot.
    assert commands == [
        ev.Reply(
            protocol.NewMessages("3", chat_3),
            "new_messages",
            Receipt("alice", marks=(SeqMark("3", 2, "32", 2, first=1),)),
        ),
        ev.ReadUpdates("alice", "1", 2, 12, 4),  # after her version mark, up to the snapshot
    ]

    changes_1 = (message("3", version=10, edited=True), message("4", version=12, deleted=True))
    commands = m.handle(ev.UpdatesRead("1", changes_1), at(1))
    assert commands == [
        ev.Reply(
            protocol.UpdatedMessages("1", changes_1),
            "updated_messages",
            Receipt("alice", marks=(SeqMark("1", version=12),)),
        ),
        ev.ReadUpdates("alice", "4", 5, 15, 10),
    ]

    changes_4 = (message("41", "4", seq=8, version=14, edited=True),)
    commands = m.handle(ev.UpdatesRead("4", changes_4), at(1))
    assert commands == [
        ev.Reply(
            protocol.UpdatedMessages("4", changes_4),
            "updated_messages",
            Receipt("alice", marks=(SeqMark("4", version=15),)),
        ),
        ev.Replay(),
    ]
    assert m.handle(ev.Replayed(), at(1)) == []
    assert state_of(m) is State.BOUND
    # The counters are of new chats and new messages; changes are not new messages.
    assert (m.backlog_chats, m.backlog_messages) == (1, 4)


def test_empty_reads_send_nothing_and_go_on_to_the_next_chat() -> None:
    m = machine()
    start_binding(m, PLAN_WITH_UPDATES)
    assert m.handle(ev.BacklogRead("1", ()), at(1)) == [ev.ReadBacklog("alice", "3", 0, 2)]
    assert m.handle(ev.BacklogRead("3", ()), at(1)) == [ev.ReadUpdates("alice", "1", 2, 12, 4)]
    assert m.handle(ev.UpdatesRead("1", ()), at(1)) == [ev.ReadUpdates("alice", "4", 5, 15, 10)]
    assert m.handle(ev.UpdatesRead("4", ()), at(1)) == [ev.Replay()]
    assert (m.backlog_chats, m.backlog_messages) == (1, 0)


def test_a_chat_with_only_updates_is_read_after_every_new_message() -> None:
    m = machine()
    plan = BacklogPlan(
        chats=(),
        message_chats=(("5", 1),),
        update_chats=(("4", 5, 10),),
        high_water={"4": (10, 15), "5": (3, 3)},
    )
    assert types(start_binding(m, plan)) == ["Reply:authenticated", "ReadBacklog"]
    commands = m.handle(ev.BacklogRead("5", (message("52", "5", seq=2),)), at(1))
    assert types(commands) == ["Reply:new_messages", "ReadUpdates"]
    assert commands[1] == ev.ReadUpdates("alice", "4", 5, 15, 10)


def test_a_failed_updates_read_unbinds_and_closes_1011() -> None:
    m = machine()
    start_binding(m, PLAN_WITH_UPDATES)
    m.handle(ev.BacklogRead("1", ()), at(1))
    assert types(m.handle(ev.BacklogRead("3", ()), at(1))) == ["ReadUpdates"]
    commands = m.handle(ev.BacklogFailed(RuntimeError("disk")), at(1))
    assert types(commands) == ["Unsubscribe", "ReportInternal", "Close"]
    assert state_of(m) is State.UNBOUND
    assert m.handle(ev.FanOut(updated("3", 13)), at(1)) == []


# The race of a change: the backlog reads messages in their current state, so one changed
# after the snapshot (here message 5 of chat 1, edited at version 8 while chat 1 was at 7 in
# the snapshot) reaches the client in that newer state. Its message_updated up to that state
# is then a duplicate and dropped, parked or live; a later change of it, or a change of
# another message, is sent.
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (updated("5", 8), False),  # the state the backlog carried
        (updated("5", 10), True),  # a later change of the same message
        (updated("6", 9), True),  # another message's change after the snapshot
        (updated("6", 7), False),  # a change the snapshot saw
        (fan_out("8", version=11), True),  # a new message after the snapshot
        (receipt_item(chat_id="1"), True),
    ],
    ids=["same-state", "later-change", "other-message", "covered", "new-message", "receipt"],
)
@pytest.mark.parametrize("read_in", ["new_messages", "updated_messages"])
def test_a_message_read_in_a_newer_state_drops_its_older_updates(
    item: Outgoing, expected: bool, read_in: str
) -> None:
    m = machine()
    plan = BacklogPlan(
        chats=(),
        message_chats=(("1", 4),),
        update_chats=(("1", 2, 4),),
        high_water={"1": (7, 7)},
    )
    start_binding(m, plan)
    assert m.handle(ev.FanOut(item), at(1)) == []
    newer = message("5", version=8, edited=True)
    if read_in == "new_messages":
        m.handle(ev.BacklogRead("1", (newer, message("7"))), at(1))
        commands = m.handle(ev.UpdatesRead("1", ()), at(1))
    else:
        m.handle(ev.BacklogRead("1", ()), at(1))
        commands = m.handle(ev.UpdatesRead("1", (message("2", edited=True), newer)), at(1))
    assert [c for c in commands if isinstance(c, ev.Write)] == (
        [ev.Write(item)] if expected else []
    )
    assert types(commands)[-1] == "Replay"
    assert m.handle(ev.Replayed(), at(1)) == []
    # Live, once bound (e.g. the same change through another node): the same decision.
    assert m.handle(ev.FanOut(item), at(2)) == ([ev.Push(item)] if expected else [])
    # Once the binding's memory is gone, nothing is dropped any more.
    later = at(1 + BACKLOG_MEMORY_S + 0.001)
    assert m.handle(ev.FanOut(updated("5", 8)), later) == [ev.Push(updated("5", 8))]


def test_the_newer_state_read_in_the_backlog_is_remembered_per_message() -> None:
    m = machine()
    plan = BacklogPlan(
        chats=(), message_chats=(("1", 0), ("3", 0)), high_water={"1": (7, 7), "3": (2, 2)}
    )
    start_binding(m, plan)
    # Message 5 read at version 9 (edited twice after the snapshot), message 31 at its own.
    m.handle(ev.BacklogRead("1", (message("5", version=9, edited=True),)), at(1))
    m.handle(ev.BacklogRead("3", (message("31", "3", seq=1, version=1),)), at(1))
    m.handle(ev.Replayed(), at(1))
    assert m.handle(ev.FanOut(updated("5", 8)), at(2)) == []  # an older state than the client's
    assert m.handle(ev.FanOut(updated("5", 9)), at(2)) == []
    assert m.handle(ev.FanOut(updated("5", 10)), at(2)) == [ev.Push(updated("5", 10))]
    # Message 31 was read in its snapshot state: its first change after it is sent.
    assert m.handle(ev.FanOut(updated("31", 3, "3")), at(2)) == [ev.Push(updated("31", 3, "3"))]


def test_a_change_the_backlog_carried_still_reports_its_delivery() -> None:
    """The change is not sent again, but its receipt is, as a frame of no bytes in its place
    in the stream: otherwise the user's change mark would never cover it, and the next
    binding would offer it again in `updated_messages`."""
    m = machine()
    plan = BacklogPlan(chats=(), message_chats=(("1", 4),), high_water={"1": (7, 7)})
    start_binding(m, plan)
    mark = Receipt("alice", marks=(SeqMark("1", version=8),))
    parked = attrs.evolve(updated("5", 8), receipt=mark)
    assert m.handle(ev.FanOut(parked), at(1)) == []  # parked while binding
    commands = m.handle(ev.BacklogRead("1", (message("5", version=8, edited=True),)), at(1))
    writes = [c for c in commands if isinstance(c, ev.Write)]
    assert writes == [ev.Write(Outgoing("", MARK_ONLY, mark))]
    assert m.handle(ev.Replayed(), at(1)) == []
    # Live, the same: a receipt-only push; an item without a receipt is dropped outright.
    assert m.handle(ev.FanOut(parked), at(2)) == [ev.Push(Outgoing("", MARK_ONLY, mark))]
    assert m.handle(ev.FanOut(updated("5", 8)), at(2)) == []


# --------------------------------------------------------------------------- authentication


def test_unbound_serves_ping_and_refuses_everything_else() -> None:
    m = machine()
    assert m.handle(frame({"type": "ping"}), at(1)) == [ev.Reply(protocol.Pong(), "pong")]
    commands = m.handle(frame({"type": "fetch_chats", "request_id": 3}), at(1))
    assert error_code(commands[0]) is ErrorCode.UNAUTHORIZED
    assert error_frame(commands[0]).request_id == 3


def test_an_invalid_query_token_leaves_the_connection_open_and_unbound() -> None:
    m = machine()
    commands = m.handle(ev.Opened("bad"), at(1))
    assert [error_code(c) for c in commands] == [ErrorCode.UNAUTHORIZED]
    assert state_of(m) is State.UNBOUND


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
    assert error_frame(commands[0]).retry_after_ms == 1000


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
    assert isinstance(load.frame, protocol.SendMessage)
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


def test_create_chat_replies_with_the_chat_object_and_counts_it_delivered() -> None:
    m = machine()
    bind(m)
    (store,) = m.handle(
        frame({"type": "create_chat", "recipient_id": "bob", "request_id": 3}), at(2)
    )
    assert isinstance(store, ev.StoreChat)
    created = view("5")
    assert m.handle(ev.ChatStored(store.frame, created, True), at(2)) == [
        ev.Reply(protocol.NewChats((created,), 3), "new_chats", Receipt("alice", chat_ids=("5",)))
    ]


def test_fetch_chats_streams_one_answer_at_a_time() -> None:
    m = machine()
    bind(m)
    (listing,) = m.handle(frame({"type": "fetch_chats", "limit": 5}), at(2))
    assert isinstance(listing, ev.ListChats)
    chats = (view("1"), view("2", "carol", "alice"))
    commands = m.handle(ev.ChatsListed(listing.frame, chats), at(2))
    assert commands == [
        ev.Reply(protocol.AllChats(chats), "all_chats", Receipt("alice", chat_ids=("1", "2"))),
        ev.StreamHistories(listing.frame, ("1", "2")),
    ]
    # A second fetch while the first is streaming is refused with a retry hint.
    refused = m.handle(frame({"type": "fetch_chats", "request_id": 2}), at(2))
    assert [error_code(c) for c in refused] == [ErrorCode.RATE_LIMITED]
    page = (message("3"), message("4", sender="alice"))
    (reply,) = m.handle(ev.HistoryRead(listing.frame, "1", page, True), at(2))
    # What it returns counts as delivered: the page's seq range, never the changes' mark.
    assert isinstance(reply, ev.Reply)
    assert reply.receipt == Receipt("alice", marks=(SeqMark("1", 4, "4", 0, first=3),))
    assert m.handle(ev.HistoryDone(listing.frame), at(2)) == []
    (again,) = m.handle(frame({"type": "fetch_chats"}), at(2))
    assert isinstance(again, ev.ListChats)


def test_fetch_chats_limit_0_lists_the_chats_alone() -> None:
    m = machine()
    bind(m)
    (listing,) = m.handle(frame({"type": "fetch_chats", "limit": 0, "request_id": "z"}), at(2))
    assert listing == ev.ListChats(protocol.FetchChats(0, request_id="z"), "alice")
    assert isinstance(listing, ev.ListChats)
    chats = (view("1"), view("2", "carol", "alice"))
    # Only the chats count as delivered then; no history is streamed.
    assert m.handle(ev.ChatsListed(listing.frame, chats), at(2)) == [
        ev.Reply(protocol.AllChats(chats, "z"), "all_chats", Receipt("alice", chat_ids=("1", "2")))
    ]
    # Nothing is in progress: the next fetch_chats is served, not refused.
    for limit in (0, 5):
        (again,) = m.handle(frame({"type": "fetch_chats", "limit": limit}), at(2))
        assert isinstance(again, ev.ListChats)
        assert types(m.handle(ev.ChatsListed(again.frame, chats), at(2)))[0] == "Reply:all_chats"


def test_fetch_chats_with_no_chats_streams_nothing() -> None:
    m = machine()
    bind(m)
    (listing,) = m.handle(frame({"type": "fetch_chats"}), at(2))
    assert isinstance(listing, ev.ListChats)
    assert types(m.handle(ev.ChatsListed(listing.frame, ()), at(2))) == ["Reply:all_chats"]
    (again,) = m.handle(frame({"type": "fetch_chats"}), at(2))
    assert isinstance(again, ev.ListChats)


@pytest.mark.parametrize(
    ("page", "receipt"),
    [
        ((), None),
        ((message("3"),), Receipt("alice", marks=(SeqMark("1", 3, "3", 0, first=3),))),
        (
            (message("10", sender="alice"), message("11"), message("12", deleted=True)),
            Receipt("alice", marks=(SeqMark("1", 12, "12", 0, first=10),)),
        ),
        # A message read in a newer state: the page still moves no changes' mark.
        (
            (message("6", version=30, edited=True),),
            Receipt("alice", marks=(SeqMark("1", 6, "6", 0, first=6),)),
        ),
    ],
    ids=["empty", "one", "range-with-own-and-tombstone", "edited"],
)
def test_a_history_page_delivers_its_seq_range(
    page: tuple[protocol.Message, ...], receipt: Receipt | None
) -> None:
    m = machine()
    bind(m)
    fetch = {"type": "fetch_messages", "chat_id": "1", "before": "13", "request_id": 6}
    (load,) = m.handle(frame(fetch), at(2))
    assert isinstance(load, ev.LoadChat)
    assert isinstance(load.frame, protocol.FetchMessages)
    assert m.handle(ev.ChatLoaded(load.frame, chat("1")), at(2)) == [ev.ReadPage(load.frame)]
    assert m.handle(ev.PageRead(load.frame, (page, True)), at(2)) == [
        ev.Reply(protocol.AllMessages("1", page, True, 6), "all_messages", receipt)
    ]
    # The same receipt for the same page of a fetch_chats answer.
    (listing,) = m.handle(frame({"type": "fetch_chats"}), at(2))
    assert isinstance(listing, ev.ListChats)
    m.handle(ev.ChatsListed(listing.frame, (view("1"),)), at(2))
    (reply,) = m.handle(ev.HistoryRead(listing.frame, "1", page, False), at(2))
    assert isinstance(reply, ev.Reply)
    assert reply.receipt == receipt


def test_a_page_before_a_message_of_another_chat_is_bad_request() -> None:
    m = machine()
    bind(m)
    (load,) = m.handle(frame({"type": "fetch_messages", "chat_id": "1", "before": "x"}), at(2))
    assert isinstance(load, ev.LoadChat)
    assert isinstance(load.frame, protocol.FetchMessages)
    assert error_of(m.handle(ev.PageRead(load.frame, None), at(2))) == (
        ErrorCode.BAD_REQUEST,
        "before",
        None,
    )


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


# --------------------------------------------------------------------------- receipts, edits

MARK_READ = {"type": "mark_read", "chat_id": "1", "message_id": "5", "request_id": "mr"}
EDIT = {
    "type": "edit_message",
    "chat_id": "1",
    "message_id": "5",
    "content": "new",
    "request_id": 8,
}
DELETE = {"type": "delete_message", "chat_id": "1", "message_id": "5", "request_id": "del"}
CHANGES = [pytest.param(EDIT, id="edit"), pytest.param(DELETE, id="delete")]
MESSAGE_FRAMES = [pytest.param(MARK_READ, id="mark_read"), *CHANGES]


def loaded(
    m: SessionMachine, obj: dict[str, Any], loaded_chat: protocol.Chat | None
) -> list[ev.Command]:
    """Send the frame; it must ask for its chat first; feed the chat back."""
    (load,) = m.handle(frame(obj), at(2))
    assert load == ev.LoadChat(protocol.decode(json.dumps(obj)))  # type: ignore[arg-type]
    assert isinstance(load, ev.LoadChat)
    return m.handle(ev.ChatLoaded(load.frame, loaded_chat), at(2))


@pytest.mark.parametrize(
    "loaded_chat",
    [chat("1"), chat("1", "carol", "alice")],  # no recipient to check: any chat of the user
    ids=["with-bob", "with-carol"],
)
@pytest.mark.parametrize("obj", MESSAGE_FRAMES)
def test_message_frames_load_the_chat_then_store(
    obj: dict[str, Any], loaded_chat: protocol.Chat
) -> None:
    m = machine()
    bind(m)
    decoded = protocol.decode(json.dumps(obj))
    expected: ev.Command
    if isinstance(decoded, protocol.MarkRead):
        expected = ev.StoreRead(decoded, loaded_chat, "alice")
    else:
        assert isinstance(decoded, protocol.EditMessage | protocol.DeleteMessage)
        expected = ev.StoreChange(decoded, loaded_chat, "alice")
    assert loaded(m, obj, loaded_chat) == [expected]


@pytest.mark.parametrize(
    ("loaded_chat", "code"),
    [
        (None, ErrorCode.NOT_FOUND),
        (chat("1", "carol", "dave"), ErrorCode.FORBIDDEN),
    ],
    ids=["not-found", "forbidden"],
)
@pytest.mark.parametrize("obj", MESSAGE_FRAMES)
def test_message_frame_refusals_store_nothing(
    obj: dict[str, Any], loaded_chat: protocol.Chat | None, code: ErrorCode
) -> None:
    m = machine()
    bind(m)
    assert error_of(loaded(m, obj, loaded_chat)) == (code, "chat_id", obj["request_id"])


def test_message_frames_need_a_bound_connection() -> None:
    m = machine()
    for obj in (MARK_READ, EDIT, DELETE):
        assert error_of(m.handle(frame(obj), at(1))) == (
            ErrorCode.UNAUTHORIZED,
            "token",
            obj["request_id"],
        )


READ_MARK = protocol.ReceiptFrame("1", "alice", "read", 6, "6", WHEN)


def test_a_mark_read_that_moved_is_answered_by_its_fan_out() -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, MARK_READ, chat("1"))
    assert isinstance(store, ev.StoreRead)
    assert m.handle(ev.ReadStored(store.frame, READ_MARK, True), at(2)) == []


def test_a_mark_read_that_did_not_move_answers_the_current_mark() -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, MARK_READ, chat("1"))
    assert isinstance(store, ev.StoreRead)
    # Message 5 is below the read mark (6): the answer is the mark as it is, with the
    # request_id, and delivers nothing.
    assert m.handle(ev.ReadStored(store.frame, READ_MARK, False), at(2)) == [
        ev.Reply(protocol.ReceiptFrame("1", "alice", "read", 6, "6", WHEN, "mr"), "receipt")
    ]


@pytest.mark.parametrize("obj", CHANGES)
def test_a_change_is_acknowledged_by_its_fan_out(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, chat("1"))
    assert isinstance(store, ev.StoreChange)
    changed = message("5", sender="alice", version=9, edited=True)
    assert m.handle(ev.ChangeStored(store.frame, changed, True), at(2)) == []


@pytest.mark.parametrize("obj", CHANGES)
def test_a_change_that_changed_nothing_is_answered_with_the_message(obj: dict[str, Any]) -> None:
    """Deleting a tombstone again: answered the same, with the message as it is."""
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, chat("1"))
    assert isinstance(store, ev.StoreChange)
    tombstone = message("5", sender="alice", version=9, deleted=True)
    assert m.handle(ev.ChangeStored(store.frame, tombstone, False), at(2)) == [
        ev.Reply(protocol.MessageUpdated(tombstone, obj["request_id"]), "message_updated")
    ]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ProtocolError(ErrorCode.BAD_REQUEST, "not a message of this chat", field="message_id"),
            (ErrorCode.BAD_REQUEST, "message_id"),
        ),
        (
            ProtocolError(ErrorCode.BAD_REQUEST, "the message is deleted", field="message_id"),
            (ErrorCode.BAD_REQUEST, "message_id"),
        ),
        (
            ProtocolError(ErrorCode.FORBIDDEN, "only its sender may change a message"),
            (ErrorCode.FORBIDDEN, None),
        ),
        (RuntimeError("boom"), None),
        (StoreUnavailable("database down"), None),
    ],
    ids=["not-of-chat", "deleted", "forbidden", "fault", "unavailable"],
)
@pytest.mark.parametrize("obj", MESSAGE_FRAMES)
def test_store_refusals_answer_their_code_and_faults_answer_internal(
    obj: dict[str, Any], error: Exception, expected: tuple[ErrorCode, str | None] | None
) -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, chat("1"))
    assert isinstance(store, ev.StoreRead | ev.StoreChange)
    commands = m.handle(ev.RequestFailed(store.frame, error), at(2))
    if expected is None:
        assert commands == [ev.ReportInternal(error, obj["request_id"])]
    else:
        assert error_of(commands) == (*expected, obj["request_id"])
    assert state_of(m) is State.BOUND  # recoverable: the connection goes on
    assert types(m.handle(frame({"type": "ping"}), at(3))) == ["Reply:pong"]


def test_internal_error_quotes_the_correlation_id() -> None:
    frame_ = internal_error("abc123", 5)
    assert frame_.code is ErrorCode.INTERNAL
    assert "abc123" in frame_.message
    assert frame_.request_id == 5


# --------------------------------------------------------------------------- groups


def group(chat_id: str, *members: str, creator: str = "alice") -> protocol.Chat:
    return protocol.Chat(chat_id, tuple(sorted(members)), creator, WHEN, protocol.GROUP, "Team")


GROUP = group("1", "alice", "bob", "carol")
CREATE_GROUP = {"type": "create_group", "title": "Team", "member_ids": ["bob"], "request_id": 1}
ADD_MEMBERS = {"type": "add_members", "chat_id": "1", "member_ids": ["dave"], "request_id": "a"}
REMOVE_MEMBER = {"type": "remove_member", "chat_id": "1", "user_id": "bob", "request_id": "x"}
MEMBER_FRAMES = [
    pytest.param(ADD_MEMBERS, id="add_members"),
    pytest.param(REMOVE_MEMBER, id="remove_member"),
]
_ABSENT: Any = object()  # a field left out of the frame
GROUP_SEND = {"type": "send_message", "chat_id": "1", "content": "hi all", "request_id": "s"}


def test_create_group_stores_the_group_and_replies_with_it_delivered() -> None:
    m = machine()
    bind(m)
    (store,) = m.handle(frame(CREATE_GROUP), at(2))
    assert store == ev.StoreGroup(protocol.CreateGroup("Team", ("bob",), request_id=1), "alice")
    assert isinstance(store, ev.StoreGroup)
    created = protocol.ChatView.fresh(group("9", "alice", "bob"))
    assert m.handle(ev.ChatStored(store.frame, created, True), at(2)) == [
        ev.Reply(protocol.NewChats((created,), 1), "new_chats", Receipt("alice", chat_ids=("9",)))
    ]


@pytest.mark.parametrize(
    "member_ids", [["alice"], ["bob", "alice"], ["carol", "dave", "alice"]], ids=repr
)
def test_create_group_naming_the_creator_is_bad_request(member_ids: list[str]) -> None:
    m = machine()
    bind(m)
    commands = m.handle(frame({**CREATE_GROUP, "member_ids": member_ids}), at(2))
    assert error_of(commands) == (ErrorCode.BAD_REQUEST, "member_ids", 1)
    assert state_of(m) is State.BOUND


def test_create_group_needs_a_bound_connection_and_a_carried_token_binds_first() -> None:
    m = machine()
    assert error_of(m.handle(frame(CREATE_GROUP), at(1))) == (ErrorCode.UNAUTHORIZED, "token", 1)
    # With the token: bound first, then served, the creator check against the bound user.
    commands = m.handle(frame({**CREATE_GROUP, "member_ids": ["alice"], "token": "alice"}), at(1))
    assert types(commands) == ["Subscribe"]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    assert error_of(m.handle(ev.Replayed(), at(1))) == (ErrorCode.BAD_REQUEST, "member_ids", 1)


@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_member_frames_load_the_group_then_store(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    decoded = protocol.decode(json.dumps(obj))
    assert isinstance(decoded, protocol.AddMembers | protocol.RemoveMember)
    assert loaded(m, obj, GROUP) == [ev.StoreMembers(decoded, GROUP, "alice")]
    # Any member may ask (the store decides who may remove whom).
    m = machine()
    bind(m, "bob")
    assert loaded(m, obj, GROUP) == [ev.StoreMembers(decoded, GROUP, "bob")]


@pytest.mark.parametrize(
    ("loaded_chat", "code", "field"),
    [
        (None, ErrorCode.NOT_FOUND, "chat_id"),
        (chat("1"), ErrorCode.BAD_REQUEST, "chat_id"),  # a direct chat of hers
        (chat("1", "carol", "dave"), ErrorCode.FORBIDDEN, "chat_id"),  # someone else's direct
        (group("1", "bob", "carol"), ErrorCode.FORBIDDEN, "chat_id"),  # a group she is not in
        (group("1", "bob", "carol", creator="alice"), ErrorCode.FORBIDDEN, "chat_id"),  # left
    ],
    ids=["not-found", "direct", "others-direct", "not-a-member", "creator-who-left"],
)
@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_member_frame_refusals_store_nothing(
    obj: dict[str, Any], loaded_chat: protocol.Chat | None, code: ErrorCode, field: str
) -> None:
    m = machine()
    bind(m)
    assert error_of(loaded(m, obj, loaded_chat)) == (code, field, obj["request_id"])
    assert state_of(m) is State.BOUND


@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_member_frames_need_a_bound_connection(obj: dict[str, Any]) -> None:
    m = machine()
    assert error_of(m.handle(frame(obj), at(1))) == (
        ErrorCode.UNAUTHORIZED,
        "token",
        obj["request_id"],
    )


@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_a_members_change_that_changed_something_is_answered_by_its_fan_out(
    obj: dict[str, Any],
) -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, GROUP)
    assert isinstance(store, ev.StoreMembers)
    after = protocol.ChatView.fresh(group("1", "alice", "carol", "dave"))
    assert m.handle(ev.MembersStored(store.frame, after, True), at(2)) == []


@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_a_members_change_that_changed_nothing_answers_the_chat_object(
    obj: dict[str, Any],
) -> None:
    """Adding only users who are members already: the requester is answered with the chat
    object as it is, with the request_id, and nothing is delivered by it."""
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, GROUP)
    assert isinstance(store, ev.StoreMembers)
    now = protocol.ChatView(
        GROUP,
        message("3"),
        2,
        (("alice", 1), ("bob", 3), ("carol", 0)),
        (("alice", 3), ("bob", 3), ("carol", 3)),
    )
    assert m.handle(ev.MembersStored(store.frame, now, False), at(2)) == [
        ev.Reply(protocol.ChatUpdated(now, obj["request_id"]), "chat_updated")
    ]


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ProtocolError(ErrorCode.FORBIDDEN, "only the creator", field="user_id"),
            (ErrorCode.FORBIDDEN, "user_id"),
        ),
        (
            ProtocolError(ErrorCode.FORBIDDEN, "not a member", field="chat_id"),
            (ErrorCode.FORBIDDEN, "chat_id"),
        ),
        (
            ProtocolError(ErrorCode.BAD_REQUEST, "at most 256", field="member_ids"),
            (ErrorCode.BAD_REQUEST, "member_ids"),
        ),
        (
            ProtocolError(ErrorCode.BAD_REQUEST, "not a member", field="user_id"),
            (ErrorCode.BAD_REQUEST, "user_id"),
        ),
        (RuntimeError("boom"), None),
        (StoreUnavailable("database down"), None),
    ],
    ids=["not-creator", "not-member", "too-many", "target-not-member", "fault", "unavailable"],
)
@pytest.mark.parametrize("obj", MEMBER_FRAMES)
def test_member_store_refusals_answer_their_code_and_faults_answer_internal(
    obj: dict[str, Any], error: Exception, expected: tuple[ErrorCode, str] | None
) -> None:
    m = machine()
    bind(m)
    (store,) = loaded(m, obj, GROUP)
    assert isinstance(store, ev.StoreMembers)
    commands = m.handle(ev.RequestFailed(store.frame, error), at(2))
    if expected is None:
        assert commands == [ev.ReportInternal(error, obj["request_id"])]
    else:
        assert error_of(commands) == (*expected, obj["request_id"])
    assert types(m.handle(frame({"type": "ping"}), at(3))) == ["Reply:pong"]


def test_create_group_store_refusal_answers_with_the_request_id() -> None:
    m = machine()
    bind(m)
    (store,) = m.handle(frame(CREATE_GROUP), at(2))
    assert isinstance(store, ev.StoreGroup)
    fault = StoreUnavailable("database down")
    assert m.handle(ev.RequestFailed(store.frame, fault), at(2)) == [ev.ReportInternal(fault, 1)]


# send_message: recipient_id is checked once the chat is known (it decodes either way).
@pytest.mark.parametrize(
    ("loaded_chat", "recipient", "expected"),
    [
        (chat("1"), "bob", None),
        (chat("1"), _ABSENT, "recipient_id"),  # a direct chat needs it
        (chat("1"), None, "recipient_id"),  # null is absent
        (chat("1"), "carol", "recipient_id"),  # not the other participant
        (chat("1"), "alice", "recipient_id"),  # herself
        (GROUP, _ABSENT, None),  # a group message names nobody
        (GROUP, None, None),
        (GROUP, "bob", "recipient_id"),  # a member: still not allowed
        (GROUP, "dave", "recipient_id"),
        (GROUP, "alice", "recipient_id"),
    ],
    ids=[
        "direct-ok",
        "direct-missing",
        "direct-null",
        "direct-other",
        "direct-self",
        "group-missing",
        "group-null",
        "group-member",
        "group-stranger",
        "group-self",
    ],
)
def test_send_message_recipient_id_follows_the_kind(
    loaded_chat: protocol.Chat, recipient: Any, expected: str | None
) -> None:
    m = machine()
    bind(m)
    obj = dict(GROUP_SEND)
    if recipient is not _ABSENT:
        obj["recipient_id"] = recipient
    (load,) = m.handle(frame(obj), at(2))
    assert isinstance(load, ev.LoadChat)
    assert isinstance(load.frame, protocol.SendMessage)
    commands = m.handle(ev.ChatLoaded(load.frame, loaded_chat), at(2))
    if expected is None:
        assert commands == [ev.StoreMessage(load.frame, loaded_chat, "alice")]
    else:
        assert error_of(commands) == (ErrorCode.BAD_REQUEST, expected, "s")
        assert state_of(m) is State.BOUND


@pytest.mark.parametrize(
    ("loaded_chat", "code"),
    [
        (None, ErrorCode.NOT_FOUND),
        (group("1", "bob", "carol"), ErrorCode.FORBIDDEN),  # not (or no longer) a member
    ],
    ids=["not-found", "not-a-member"],
)
def test_send_message_to_a_group_refusals(
    loaded_chat: protocol.Chat | None, code: ErrorCode
) -> None:
    """Membership is checked before recipient_id: a stranger learns nothing more."""
    for obj in (GROUP_SEND, {**GROUP_SEND, "recipient_id": "bob"}):
        m = machine()
        bind(m)
        (load,) = m.handle(frame(obj), at(2))
        assert isinstance(load, ev.LoadChat)
        commands = m.handle(ev.ChatLoaded(load.frame, loaded_chat), at(2))
        assert error_of(commands) == (code, "chat_id", "s")


@pytest.mark.parametrize("obj", MESSAGE_FRAMES)
def test_message_frames_in_a_group_need_membership(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    decoded = protocol.decode(json.dumps(obj))
    assert isinstance(decoded, protocol.MarkRead | protocol.EditMessage | protocol.DeleteMessage)
    command = loaded(m, obj, GROUP)
    assert types(command) == [
        "StoreRead" if isinstance(decoded, protocol.MarkRead) else "StoreChange"
    ]
    m = machine()
    bind(m)
    assert error_of(loaded(m, obj, group("1", "bob", "carol"))) == (
        ErrorCode.FORBIDDEN,
        "chat_id",
        obj["request_id"],
    )


def test_chat_updated_fan_out_passes_like_a_receipt() -> None:
    """A `chat_updated` is no backlog's (not replayed on binding): never covered by one."""
    item = Outgoing("live chat_updated 1", "chat_updated", None, 0.0, None, "1")
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    assert m.handle(ev.FanOut(item), at(1)) == []  # parked while binding
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert ev.Write(item) in m.handle(ev.BacklogRead("1", ()), at(1))
    m.handle(ev.Replayed(), at(1))
    assert m.handle(ev.FanOut(item), at(2)) == [ev.Push(item)]


def test_a_rejoined_groups_new_chats_is_pushed_though_the_snapshot_had_the_chat() -> None:
    """Alice bound while a member of group 1 (the snapshot saw it at version 7); then she was
    removed and added again. The hub hands her the group as a new chat without a version (a
    join is not one of the chat's changes): it is not a chat her snapshot carried as new, so
    it must be pushed live, not dropped as a duplicate of her binding's backlog."""
    m = machine()
    bind(m)
    removed = Outgoing("live chat_updated 1", "chat_updated", None, 0.0, None, "1")
    assert m.handle(ev.FanOut(removed), at(2)) == [ev.Push(removed)]
    rejoined = Outgoing(
        "live new_chats 1", "new_chats", Receipt("alice", chat_ids=("1",)), 0.0, None, "1"
    )
    assert m.handle(ev.FanOut(rejoined), at(3)) == [ev.Push(rejoined)]


def test_a_join_the_snapshot_carried_as_a_new_chat_is_not_pushed_again() -> None:
    """Added to group 2 while binding: the snapshot already had it as a new chat (the
    backlog's `new_chats`), so the live `new_chats` of the join is covered: once, not twice."""
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    joined = Outgoing(
        "live new_chats 2", "new_chats", Receipt("alice", chat_ids=("2",)), 0.0, None, "2"
    )
    assert m.handle(ev.FanOut(joined), at(1)) == []  # parked while binding
    commands = m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert [c.frame_type for c in commands if isinstance(c, ev.Reply)] == [
        "authenticated",
        "new_chats",
    ]
    replay = m.handle(ev.BacklogRead("1", ()), at(1))
    assert ev.Write(joined) not in replay
    m.handle(ev.Replayed(), at(1))
    assert m.handle(ev.FanOut(joined), at(2)) == []  # a late copy of it: covered too


# --------------------------------------------------------------------------- typing

TYPING_STOP_S = protocol.TYPING_EXPIRES_MS / 1000  # how long a receiver shows it


def typing_frame(chat_id: str = "1", active: bool | None = None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": "typing", "chat_id": chat_id, **extra}
    if active is not None:
        obj["active"] = active
    return obj


def typed(
    m: SessionMachine, obj: dict[str, Any], t: float, loaded_chat: protocol.Chat | None
) -> list[ev.Command]:
    """Send a typing frame at `t`: it loads its chat first, like every chat frame."""
    decoded = protocol.decode(json.dumps(obj))
    assert isinstance(decoded, protocol.Typing)
    assert m.handle(ev.FrameReceived(decoded), at(t)) == [ev.LoadChat(decoded)]
    return m.handle(ev.ChatLoaded(decoded, loaded_chat), at(t))


def forwarded(commands: list[ev.Command]) -> bool:
    """The commands are one SendTyping; whether it tells the other participants."""
    (command,) = commands
    assert isinstance(command, ev.SendTyping)
    return command.forward


@pytest.mark.parametrize(
    ("loaded_chat", "active"),
    [
        (chat("1"), True),
        (chat("1"), False),
        (chat("1", "carol", "alice"), True),
        (GROUP, True),
        (GROUP, False),
    ],
    ids=["direct", "direct-stopped", "direct-with-carol", "group", "group-stopped"],
)
def test_typing_loads_the_chat_then_sends_typing(loaded_chat: protocol.Chat, active: bool) -> None:
    m = machine()
    bind(m)
    obj = typing_frame(active=active, request_id="t")
    assert typed(m, obj, 2, loaded_chat) == [
        ev.SendTyping(protocol.Typing("1", active, request_id="t"), loaded_chat, "alice")
    ]


def test_typing_without_active_is_active() -> None:
    m = machine()
    bind(m)
    (send,) = typed(m, typing_frame(), 2, chat("1"))
    assert send == ev.SendTyping(protocol.Typing("1", True), chat("1"), "alice", forward=True)


@pytest.mark.parametrize(
    ("loaded_chat", "code"),
    [
        (None, ErrorCode.NOT_FOUND),
        (chat("1", "carol", "dave"), ErrorCode.FORBIDDEN),
        (group("1", "bob", "carol"), ErrorCode.FORBIDDEN),
    ],
    ids=["not-found", "not-a-participant", "not-a-member"],
)
@pytest.mark.parametrize("active", [True, False])
def test_typing_refusals_send_nothing(
    loaded_chat: protocol.Chat | None, code: ErrorCode, active: bool
) -> None:
    m = machine()
    bind(m)
    commands = typed(m, typing_frame(active=active, request_id=4), 2, loaded_chat)
    assert error_of(commands) == (code, "chat_id", 4)
    assert m.typing_left_on(3) == []


def test_typing_needs_a_bound_connection() -> None:
    m = machine()
    assert error_of(m.handle(frame(typing_frame(request_id="u")), at(1))) == (
        ErrorCode.UNAUTHORIZED,
        "token",
        "u",
    )


def test_a_typing_that_carried_the_token_is_checked_after_the_backlog() -> None:
    m = machine()
    obj = typing_frame(token="alice", request_id=1)
    assert types(m.handle(frame(obj), at(1))) == ["Subscribe"]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    m.handle(ev.BacklogRead("1", ()), at(1))
    (load,) = m.handle(ev.Replayed(), at(1))
    assert load == ev.LoadChat(protocol.Typing("1", token="alice", request_id=1))


# (seconds after the first forwarded `active: true`, the second frame's `active`, forwarded)
@pytest.mark.parametrize(
    ("after", "active", "expected"),
    [
        (0.0, True, False),  # at once: the receivers show it already
        (0.5, True, False),
        (0.999, True, False),
        (1.0, True, True),  # TYPING_REPEAT_S later: forwarded again
        (3.0, True, True),  # a client's usual renewal
        (10.0, True, True),
        (0.0, False, True),  # a stop always goes out
        (0.5, False, True),
        (3.0, False, True),
    ],
)
def test_a_renewal_within_a_second_is_checked_but_not_forwarded(
    after: float, active: bool, expected: bool
) -> None:
    m = machine()
    bind(m)
    assert forwarded(typed(m, typing_frame(active=True), 2, chat("1")))
    (second,) = typed(m, typing_frame(active=active), 2 + after, chat("1"))
    assert second == ev.SendTyping(protocol.Typing("1", active), chat("1"), "alice", expected)


def test_the_throttle_counts_from_the_last_forwarded_renewal() -> None:
    """A renewal that was not forwarded does not move the throttle: renewals sent every
    0.4 s go out once a second."""
    m = machine()
    bind(m)
    sent = [
        t
        for t in (2.0, 2.4, 2.8, 3.2, 3.6, 4.0, 4.4)
        if forwarded(typed(m, typing_frame(), t, chat("1")))
    ]
    assert sent == [2.0, 3.2, 4.4]


def test_the_throttle_is_per_chat() -> None:
    m = machine()
    bind(m)
    assert forwarded(typed(m, typing_frame("1"), 2, chat("1")))
    assert forwarded(typed(m, typing_frame("2"), 2.1, chat("2", "alice", "carol")))
    assert not forwarded(typed(m, typing_frame("1"), 2.2, chat("1")))
    assert not forwarded(typed(m, typing_frame("2"), 2.3, chat("2", "alice", "carol")))


def test_a_stop_resets_the_throttle() -> None:
    m = machine()
    bind(m)
    assert forwarded(typed(m, typing_frame(active=True), 2, chat("1")))
    assert forwarded(typed(m, typing_frame(active=False), 2.1, chat("1")))
    assert forwarded(typed(m, typing_frame(active=True), 2.2, chat("1")))  # news again


def test_a_refused_typing_resets_the_throttle() -> None:
    """The driver's check refused it (a block in the direct chat): it did not go out, so
    the next one is news; and the chat is no longer one the user is shown typing in."""
    m = machine()
    bind(m)
    (send,) = typed(m, typing_frame(request_id="b"), 2, chat("1"))
    assert isinstance(send, ev.SendTyping)
    refusal = ProtocolError(ErrorCode.FORBIDDEN, "a block is in place between you and this user")
    assert error_of(m.handle(ev.RequestFailed(send.frame, refusal), at(2))) == (
        ErrorCode.FORBIDDEN,
        None,
        "b",
    )
    assert m.typing_left_on(2.5) == []
    assert forwarded(typed(m, typing_frame(), 2.1, chat("1")))


def test_a_fault_in_typing_answers_internal() -> None:
    m = machine()
    bind(m)
    (send,) = typed(m, typing_frame(request_id=5), 2, chat("1"))
    assert isinstance(send, ev.SendTyping)
    fault = RuntimeError("bus down")
    assert m.handle(ev.RequestFailed(send.frame, fault), at(2)) == [ev.ReportInternal(fault, 5)]
    assert state_of(m) is State.BOUND


def test_a_message_in_the_chat_resets_the_throttle() -> None:
    """The receivers stop showing the typist when the message arrives."""
    m = machine()
    bind(m)
    assert forwarded(typed(m, typing_frame(), 2, chat("1")))
    send = {"type": "send_message", "chat_id": "1", "recipient_id": "bob", "content": "hi"}
    (load,) = m.handle(frame(send), at(2.1))
    assert isinstance(load, ev.LoadChat)
    assert types(m.handle(ev.ChatLoaded(load.frame, chat("1")), at(2.1))) == ["StoreMessage"]
    assert m.typing_left_on(2.2) == []
    assert forwarded(typed(m, typing_frame(), 2.2, chat("1")))


def test_a_message_in_another_chat_keeps_the_throttle() -> None:
    m = machine()
    bind(m)
    assert forwarded(typed(m, typing_frame("1"), 2, chat("1")))
    send = {"type": "send_message", "chat_id": "2", "recipient_id": "carol", "content": "hi"}
    (load,) = m.handle(frame(send), at(2.1))
    assert isinstance(load, ev.LoadChat)
    m.handle(ev.ChatLoaded(load.frame, chat("2", "alice", "carol")), at(2.1))
    assert not forwarded(typed(m, typing_frame("1"), 2.2, chat("1")))


# (when the connection closes, seconds after the last forwarded `active: true`, and whether
# the receivers may still show it: 6 s, the indicator's expiry)
@pytest.mark.parametrize(
    ("after", "shown"),
    [(0.0, True), (3.0, True), (5.999, True), (6.0, False), (60.0, False)],
)
def test_typing_left_on_names_the_chats_typed_in_within_6_seconds(
    after: float, shown: bool
) -> None:
    assert TYPING_STOP_S == 6.0
    m = machine()
    bind(m)
    typed(m, typing_frame(), 2, chat("1"))
    assert m.typing_left_on(2 + after) == ([chat("1")] if shown else [])
    assert m.typing_left_on(2 + after) == []  # cleared: told once


def test_typing_left_on_follows_each_chats_last_forwarded_renewal() -> None:
    m = machine()
    bind(m)
    carol = chat("2", "alice", "carol")
    typed(m, typing_frame("1"), 2, chat("1"))
    typed(m, typing_frame("2"), 4, carol)
    typed(m, typing_frame("1"), 2.5, chat("1"))  # not forwarded: chat 1 counts from 2
    typed(m, typing_frame("3", active=False), 4, chat("3", "alice", "dave"))  # a stop
    assert m.typing_left_on(8.5) == [carol]


def test_typing_left_on_leaves_out_stopped_chats() -> None:
    m = machine()
    bind(m)
    typed(m, typing_frame("1"), 2, chat("1"))
    typed(m, typing_frame("2"), 2, GROUP_2)
    typed(m, typing_frame("1", active=False), 3, chat("1"))
    assert m.typing_left_on(4) == [GROUP_2]


def test_typing_left_on_a_connection_that_never_typed_is_empty() -> None:
    m = machine()
    assert m.typing_left_on(1) == []
    bind(m)
    assert m.typing_left_on(2) == []


GROUP_2 = group("2", "alice", "bob", "carol")


def typing_item(chat_id: str = "1", user: str = "bob") -> Outgoing:
    """The hub's item for another participant's typing signal."""
    text = protocol.encode(protocol.TypingEvent(chat_id, user, True))
    return Outgoing(text, "typing", None, 0.0, None, chat_id)


def test_typing_fan_out_is_pushed_live_once_bound() -> None:
    m = machine()
    bind(m)
    item = typing_item()
    # Within the backlog memory too: no backlog carries typing, so nothing covers it.
    assert m.handle(ev.FanOut(item), at(2)) == [ev.Push(item)]
    assert m.fan_out(item, 2 + BACKLOG_MEMORY_S + 1) is item


def test_typing_fan_out_while_binding_is_dropped_never_parked_or_replayed() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    live = fan_out("8")
    assert m.handle(ev.FanOut(typing_item()), at(1)) == []
    assert m.handle(ev.FanOut(live), at(1)) == []
    assert m.handle(ev.FanOut(typing_item("2", "carol")), at(1)) == []
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert m.handle(ev.BacklogRead("1", ()), at(1)) == [ev.Write(live), ev.Replay()]
    # Arriving while the replay is written: dropped too, not replayed next.
    assert m.handle(ev.FanOut(typing_item()), at(1)) == []
    assert m.handle(ev.Replayed(), at(1)) == []
    assert state_of(m) is State.BOUND


def test_typing_never_counts_towards_the_park_capacity() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    # Far more typing than the park holds: no drop.
    for _ in range(RULES.park_capacity * 10):
        assert m.handle(ev.FanOut(typing_item()), at(1)) == []
    # The park is still empty: it takes its full capacity of other items...
    parked = [fan_out(str(10 + n)) for n in range(RULES.park_capacity)]
    for item in parked:
        assert m.handle(ev.FanOut(item), at(1)) == []
    # ...and once full, typing is still dropped, never the reason for a DropSlow.
    for _ in range(RULES.park_capacity * 10):
        assert m.handle(ev.FanOut(typing_item()), at(1)) == []
    assert m.handle(ev.FanOut(receipt_item()), at(1)) == [ev.DropSlow()]
    m.handle(ev.Subscribed(PLAN, TokenBucket(20.0, 40)), at(1))
    assert m.handle(ev.BacklogRead("1", ()), at(1)) == [
        *(ev.Write(item) for item in parked),
        ev.Replay(),
    ]


def test_typing_fan_out_for_a_failed_binding_is_ignored() -> None:
    m = machine()
    m.handle(ev.Opened("alice"), at(1))
    m.handle(ev.SubscribeFailed(StoreUnavailable("down")), at(1))
    assert state_of(m) is State.UNBOUND
    assert m.handle(ev.FanOut(typing_item()), at(1)) == []


# --------------------------------------------------------------------------- presence

PRESENCE = (
    protocol.PresenceEntry("bob", True),
    protocol.PresenceEntry("carol", False, "2026-12-02T18:00:00.123Z"),
)


@pytest.mark.parametrize(
    "obj",
    [
        {"type": "fetch_presence"},
        {"type": "fetch_presence", "request_id": "p"},
        {"type": "fetch_presence", "user_ids": ["bob", "carol"], "request_id": 3},
        {"type": "fetch_presence", "user_ids": ["alice"]},  # yourself: the truth
    ],
    ids=["contacts", "contacts-request-id", "asked", "yourself"],
)
def test_fetch_presence_reads_then_replies_with_the_request_id(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    decoded = protocol.decode(json.dumps(obj))
    assert isinstance(decoded, protocol.FetchPresence)
    assert m.handle(frame(obj), at(2)) == [ev.ReadPresence(decoded, "alice")]
    assert m.handle(ev.PresenceRead(decoded, PRESENCE), at(2)) == [
        ev.Reply(protocol.PresenceFrame(PRESENCE, obj.get("request_id")), "presence")
    ]


def test_an_empty_presence_answer_is_still_answered() -> None:
    m = machine()
    bind(m)
    (read,) = m.handle(frame({"type": "fetch_presence", "request_id": 0}), at(2))
    assert isinstance(read, ev.ReadPresence)
    assert m.handle(ev.PresenceRead(read.frame, ()), at(2)) == [
        ev.Reply(protocol.PresenceFrame((), 0), "presence")
    ]


def test_fetch_presence_needs_a_bound_connection() -> None:
    m = machine()
    obj = {"type": "fetch_presence", "request_id": "np"}
    assert error_of(m.handle(frame(obj), at(1))) == (ErrorCode.UNAUTHORIZED, "token", "np")


def test_a_failed_presence_read_answers_internal() -> None:
    m = machine()
    bind(m)
    (read,) = m.handle(frame({"type": "fetch_presence", "request_id": 7}), at(2))
    assert isinstance(read, ev.ReadPresence)
    fault = StoreUnavailable("database down")
    assert m.handle(ev.RequestFailed(read.frame, fault), at(2)) == [ev.ReportInternal(fault, 7)]


# --------------------------------------------------------------------------- blocking

BLOCK_FRAMES = [
    pytest.param({"type": "block_user", "user_id": "bob", "request_id": "b"}, id="block"),
    pytest.param({"type": "unblock_user", "user_id": "bob", "request_id": 2}, id="unblock"),
]


@pytest.mark.parametrize("obj", BLOCK_FRAMES)
def test_block_and_unblock_store_the_block(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    decoded = protocol.decode(json.dumps(obj))
    assert isinstance(decoded, protocol.BlockUser | protocol.UnblockUser)
    assert m.handle(frame(obj), at(2)) == [ev.StoreBlock(decoded, "alice")]


@pytest.mark.parametrize("obj", BLOCK_FRAMES)
def test_blocking_yourself_is_bad_request(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    commands = m.handle(frame({**obj, "user_id": "alice"}), at(2))
    assert error_of(commands) == (ErrorCode.BAD_REQUEST, "user_id", obj["request_id"])


@pytest.mark.parametrize("obj", BLOCK_FRAMES)
def test_a_block_that_changed_the_list_is_answered_by_its_fan_out(obj: dict[str, Any]) -> None:
    m = machine()
    bind(m)
    (store,) = m.handle(frame(obj), at(2))
    assert isinstance(store, ev.StoreBlock)
    assert m.handle(ev.BlockStored(store.frame, ("bob",), changed=True), at(2)) == []


@pytest.mark.parametrize("blocks", [(), ("bob",), ("bob", "mallory")])
@pytest.mark.parametrize("obj", BLOCK_FRAMES)
def test_a_block_that_changed_nothing_answers_the_list(
    obj: dict[str, Any], blocks: tuple[str, ...]
) -> None:
    """Idempotent: blocking again (or unblocking someone not blocked) answers the list."""
    m = machine()
    bind(m)
    (store,) = m.handle(frame(obj), at(2))
    assert isinstance(store, ev.StoreBlock)
    assert m.handle(ev.BlockStored(store.frame, blocks, changed=False), at(2)) == [
        ev.Reply(protocol.BlockedFrame(blocks, obj["request_id"]), "blocked")
    ]


@pytest.mark.parametrize("request_id", [None, "fb", 0])
def test_fetch_blocked_reads_then_replies(request_id: protocol.RequestId | None) -> None:
    m = machine()
    bind(m)
    obj: dict[str, Any] = {"type": "fetch_blocked", "request_id": request_id}
    (store,) = m.handle(frame(obj), at(2))
    assert store == ev.StoreBlock(protocol.FetchBlocked(request_id=request_id), "alice")
    assert isinstance(store, ev.StoreBlock)
    blocks = ("bob", "mallory")
    assert m.handle(ev.BlockStored(store.frame, blocks), at(2)) == [
        ev.Reply(protocol.BlockedFrame(blocks, request_id), "blocked")
    ]


@pytest.mark.parametrize(
    "obj", [*BLOCK_FRAMES, pytest.param({"type": "fetch_blocked", "request_id": "f"}, id="fetch")]
)
def test_block_frames_need_a_bound_connection(obj: dict[str, Any]) -> None:
    m = machine()
    assert error_of(m.handle(frame(obj), at(1))) == (
        ErrorCode.UNAUTHORIZED,
        "token",
        obj["request_id"],
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            ProtocolError(ErrorCode.BAD_REQUEST, "too many blocked users", field="user_id"),
            (ErrorCode.BAD_REQUEST, "user_id"),
        ),
        (RuntimeError("boom"), None),
        (StoreUnavailable("database down"), None),
    ],
    ids=["over-the-limit", "fault", "unavailable"],
)
@pytest.mark.parametrize("obj", BLOCK_FRAMES)
def test_block_store_refusals_answer_their_code_and_faults_answer_internal(
    obj: dict[str, Any], error: Exception, expected: tuple[ErrorCode, str] | None
) -> None:
    m = machine()
    bind(m)
    (store,) = m.handle(frame(obj), at(2))
    assert isinstance(store, ev.StoreBlock)
    commands = m.handle(ev.RequestFailed(store.frame, error), at(2))
    if expected is None:
        assert commands == [ev.ReportInternal(error, obj["request_id"])]
    else:
        assert error_of(commands) == (*expected, obj["request_id"])
    assert state_of(m) is State.BOUND
