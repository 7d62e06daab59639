"""`ChatOrder`, the per-chat order gate of the Redis bus: pure tables, no clock, no I/O."""

from __future__ import annotations

import math

from handler.bus.base import Delivery
from handler.bus.order import ChatOrder
from handler.protocol import Chat, Message


def event(message_id: str, previous: str | None, chat: str = "c1") -> Delivery:
    message = Message(message_id, chat, "bob", "alice", "hi", "2026-01-01T00:00:00.000Z")
    return Delivery("message", ("alice", "bob"), message=message, prev_message_id=previous)


def ids(events: list[Delivery]) -> list[str]:
    return [e.message.message_id for e in events if e.message is not None]


def test_first_event_passes_and_a_chain_follows() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("5", "4"), now=0)  # no state: whatever came before is known
    assert order.followers("alice", event("5", "4")) == []
    assert order.admit("alice", event("6", "5"), now=0)
    assert order.admit("alice", event("7", "6"), now=0)
    assert order.next_deadline() == math.inf


def test_an_early_event_waits_for_its_predecessor() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("1", None), now=0)
    assert not order.admit("alice", event("3", "2"), now=0)
    assert not order.admit("alice", event("4", "3"), now=0.01)
    assert order.held_count == 2
    assert order.next_deadline() == 0.25
    assert order.admit("alice", event("2", "1"), now=0.02)
    released = order.followers("alice", event("2", "1"))
    assert ids(released) == ["3", "4"]
    assert all(e.recipients == ("alice",) for e in released)  # narrowed to the waiting user
    assert order.held_count == 0
    assert order.admit("alice", event("5", "4"), now=0.03)  # `last` moved to the chain's end
    assert order.expire(now=10) == ([], ())  # their deadlines went stale


def test_order_is_per_user_and_per_chat() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("1", None, chat="c1"), now=0)
    assert order.admit("alice", event("2", None, chat="c2"), now=0)
    assert not order.admit("alice", event("4", "3", chat="c1"), now=0)
    assert order.admit("alice", event("5", "2", chat="c2"), now=0)  # another chat: not blocked
    assert order.admit("bob", event("4", "3", chat="c1"), now=0)  # bob has no state yet


def test_a_late_first_message_passes_without_moving_last() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("2", "1"), now=0)
    assert order.admit("alice", event("1", None), now=0)  # nothing to wait for
    assert order.admit("alice", event("3", "2"), now=0)


def test_a_missing_predecessor_releases_in_chain_order_and_asks_for_a_resync() -> None:
    order = ChatOrder(hold_s=0.25)
    assert order.admit("alice", event("1", None), now=0)
    assert not order.admit("alice", event("11", "10"), now=0.0)  # chain 10 <- 11 <- 12
    assert not order.admit("alice", event("4", "3"), now=0.1)  # chain 3 <- 4
    assert not order.admit("alice", event("12", "11"), now=0.05)
    assert order.expire(now=0.2) == ([], ())
    released, users = order.expire(now=0.25)
    assert ids(released) == ["11", "12", "4"]  # chain heads in arrival order
    assert users == ("alice",)
    assert order.held_count == 0
    assert order.expire(now=1) == ([], ())
    assert order.admit("alice", event("5", "4"), now=1)  # `last` is the last one released


def test_only_the_expired_users_are_resynced() -> None:
    order = ChatOrder(hold_s=0.25)
    for user in ("alice", "bob"):
        assert order.admit(user, event("1", None), now=0)
    assert not order.admit("alice", event("3", "2"), now=0)
    assert not order.admit("bob", event("3", "2"), now=0.2)
    released, users = order.expire(now=0.3)
    assert (ids(released), users) == (["3"], ("alice",))
    assert released[0].recipients == ("alice",)


def test_forget_drops_state_and_held_events() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("1", None), now=0)
    assert not order.admit("alice", event("3", "2"), now=0)
    order.forget("alice")
    assert order.held_count == 0
    assert order.expire(now=10) == ([], ())
    assert order.admit("alice", event("9", "8"), now=10)  # fresh, as after a new subscribe


def test_release_users_hands_back_everything_held() -> None:
    order = ChatOrder()
    assert order.admit("alice", event("1", None, chat="c1"), now=0)
    assert order.admit("alice", event("2", None, chat="c2"), now=0)
    assert not order.admit("alice", event("5", "4", chat="c1"), now=0)
    assert not order.admit("alice", event("7", "6", chat="c2"), now=0)
    assert ids(order.release_users(["alice", "nobody"])) == ["5", "7"]
    assert order.held_count == 0


def test_too_many_held_events_release_the_user_at_once() -> None:
    order = ChatOrder(held_per_user=3)
    assert order.admit("alice", event("1", None), now=0)
    for index in range(4):
        assert not order.admit("alice", event(str(10 + index), str(100 + index)), now=0)
    assert order.next_deadline() == -math.inf
    released, users = order.expire(now=0)
    assert len(released) == 4
    assert users == ("alice",)


def test_chats_per_user_are_bounded() -> None:
    order = ChatOrder(chats_per_user=2)
    for chat in ("c1", "c2", "c3"):
        assert order.admit("alice", event(f"{chat}-1", None, chat=chat), now=0)
    # c1 was the least recently used and is forgotten: its next event passes at once.
    assert order.admit("alice", event("x", "unknown", chat="c1"), now=0)
    assert not order.admit("alice", event("y", "unknown", chat="c3"), now=0)


def test_chat_events_always_pass() -> None:
    order = ChatOrder()
    chat = Chat("c1", ("alice", "bob"), "bob", "2026-01-01T00:00:00.000Z")
    assert order.admit("alice", Delivery("chat", ("alice",), chat=chat), now=0)


def test_a_new_chat_holds_its_second_message_until_the_first() -> None:
    """Two nodes' first messages of a new chat race: the chat event says it starts empty."""
    order = ChatOrder()
    order.chat_created(["bob"], "c1")
    assert not order.admit("bob", event("2", "1"), now=0)  # bob's own, published locally
    assert order.held_count == 1
    assert order.admit("bob", event("1", None), now=0.01)  # alice's, through Redis
    assert ids(order.followers("bob", event("1", None))) == ["2"]
    assert order.admit("bob", event("3", "2"), now=0.02)
    assert order.expire(1.0) == ([], ())  # nothing left to resync


def test_a_chat_event_after_its_messages_changes_nothing() -> None:
    order = ChatOrder()
    assert order.admit("bob", event("1", None), now=0)
    order.chat_created(["bob"], "c1")
    assert order.admit("bob", event("2", "1"), now=0)
