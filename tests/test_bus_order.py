"""`ChatOrder`, the per-chat order gate of the Redis bus: pure tables, no clock, no I/O.

Every change of a chat (a new message, an edit, a delete) takes the chat's next version, so
an event's place in its chat is its message's `version` and its predecessor is `version - 1`.
"""

from __future__ import annotations

import math
from typing import Literal

import pytest

from handler.bus.base import Delivery
from handler.bus.order import ChatOrder
from handler.protocol import Chat, Message, ReceiptFrame

WHEN = "2026-01-01T00:00:00.000Z"


def event(
    version: int,
    chat: str = "c1",
    *,
    kind: Literal["message", "update"] = "message",
    message_id: str | None = None,
) -> Delivery:
    """A chat's change at `version`: a new message (its id and seq the version, unless given)
    or an update of an earlier message."""
    message = Message(
        message_id or str(version),
        chat,
        "bob",
        "alice",
        "hi",
        WHEN,
        seq=int(message_id or version),
        version=version,
        edited_at=WHEN if kind == "update" else None,
    )
    return Delivery(kind, ("alice", "bob"), message=message)


def update(version: int, message_id: str, chat: str = "c1") -> Delivery:
    return event(version, chat, kind="update", message_id=message_id)


def receipt(chat: str = "c1", seq: int = 1) -> Delivery:
    frame = ReceiptFrame(chat, "bob", "read", seq, str(seq), WHEN)
    return Delivery("receipt", ("alice", "bob"), receipt=frame)


def versions(events: list[Delivery]) -> list[int]:
    return [e.message.version for e in events if e.message is not None]


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize(
    ("delivery", "position", "previous"),
    [
        (event(1), "1", "0"),  # a chat's first change: its predecessor is the empty chat
        (event(7), "7", "6"),
        (update(8, "3"), "8", "7"),  # an update's place is its new version, not its message's
        (receipt(), None, None),
        (Delivery("chat", ("alice",), chat=Chat("c1", ("alice", "bob"), "bob", WHEN)), None, None),
    ],
    ids=["first", "message", "update", "receipt", "chat"],
)
def test_an_events_position_is_its_version(
    delivery: Delivery, position: str | None, previous: str | None
) -> None:
    assert (delivery.position, delivery.previous) == (position, previous)


# --------------------------------------------------------------------------- chains


def test_first_event_passes_and_a_chain_follows() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(5), now=0)  # no state: whatever came before is known
    assert order.followers("alice", event(5)) == []
    assert order.admit("alice", event(6), now=0)
    assert order.admit("alice", event(7), now=0)
    assert order.next_deadline() == math.inf


def test_an_early_event_waits_for_its_predecessor() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", event(3), now=0)
    assert not order.admit("alice", event(4), now=0.01)
    assert order.held_count == 2
    assert order.next_deadline() == 0.25
    assert order.admit("alice", event(2), now=0.02)
    released = order.followers("alice", event(2))
    assert versions(released) == [3, 4]
    assert all(e.recipients == ("alice",) for e in released)  # narrowed to the waiting user
    assert order.held_count == 0
    assert order.admit("alice", event(5), now=0.03)  # `last` moved to the chain's end
    assert order.expire(now=10) == ([], ())  # their deadlines went stale


def test_updates_and_messages_of_a_chat_are_one_chain() -> None:
    """An edit (version 3, of message 1) between two messages: the message after it waits for
    the edit, and the edit for the message before it."""
    order = ChatOrder()
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", event(4, message_id="2"), now=0)  # message 2 at version 4
    assert not order.admit("alice", update(3, "1"), now=0)  # waits for version 2
    assert order.held_count == 2
    assert order.admit("alice", update(2, "1"), now=0.01)  # an earlier edit of message 1
    released = order.followers("alice", update(2, "1"))
    assert [(e.kind, e.message.version) for e in released if e.message] == [
        ("update", 3),
        ("message", 4),
    ]
    assert order.held_count == 0
    assert not order.admit("alice", event(6, message_id="3"), now=0.02)  # 5 is missing
    assert order.admit("alice", update(5, "2"), now=0.02)
    assert versions(order.followers("alice", update(5, "2"))) == [6]


def test_an_update_is_held_like_a_message_and_released_with_a_resync() -> None:
    order = ChatOrder(hold_s=0.25)
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", update(3, "1"), now=0)
    released, users = order.expire(now=0.25)
    assert [(e.kind, e.message.version) for e in released if e.message] == [("update", 3)]
    assert users == ("alice",)
    assert order.admit("alice", event(4), now=1)  # `last` is the update released


def test_receipts_pass_straight_through_a_held_chat() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", event(3), now=0)
    # A receipt has no place in the chain: it neither waits nor moves the chain on.
    assert order.admit("alice", receipt(seq=3), now=0)
    assert order.followers("alice", receipt(seq=3)) == []
    assert order.held_count == 1
    assert order.admit("alice", event(2), now=0)
    assert versions(order.followers("alice", event(2))) == [3]


def test_a_receipt_first_leaves_the_chat_without_state() -> None:
    order = ChatOrder()
    assert order.admit("alice", receipt(), now=0)
    assert order.admit("alice", event(9), now=0)  # still the first event of the chat here


def test_order_is_per_user_and_per_chat() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(1, chat="c1"), now=0)
    assert order.admit("alice", event(1, chat="c2"), now=0)
    assert not order.admit("alice", event(4, chat="c1"), now=0)
    assert order.admit("alice", event(2, chat="c2"), now=0)  # another chat: not blocked
    assert order.admit("bob", event(4, chat="c1"), now=0)  # bob has no state yet


def test_a_late_first_message_passes_without_moving_last() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(2), now=0)
    assert order.admit("alice", event(1), now=0)  # nothing to wait for
    assert order.admit("alice", event(3), now=0)


def test_a_missing_predecessor_releases_in_chain_order_and_asks_for_a_resync() -> None:
    order = ChatOrder(hold_s=0.25)
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", event(11), now=0.0)  # chain 10 <- 11 <- 12
    assert not order.admit("alice", event(4), now=0.1)  # chain 3 <- 4
    assert not order.admit("alice", update(12, "11"), now=0.05)
    assert order.expire(now=0.2) == ([], ())
    released, users = order.expire(now=0.25)
    assert versions(released) == [11, 12, 4]  # chain heads in arrival order
    assert users == ("alice",)
    assert order.held_count == 0
    assert order.expire(now=1) == ([], ())
    assert order.admit("alice", event(5), now=1)  # `last` is the last one released


def test_only_the_expired_users_are_resynced() -> None:
    order = ChatOrder(hold_s=0.25)
    for user in ("alice", "bob"):
        assert order.admit(user, event(1), now=0)
    assert not order.admit("alice", event(3), now=0)
    assert not order.admit("bob", event(3), now=0.2)
    released, users = order.expire(now=0.3)
    assert (versions(released), users) == ([3], ("alice",))
    assert released[0].recipients == ("alice",)


def test_forget_drops_state_and_held_events() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(1), now=0)
    assert not order.admit("alice", event(3), now=0)
    order.forget("alice")
    assert order.held_count == 0
    assert order.expire(now=10) == ([], ())
    assert order.admit("alice", event(9), now=10)  # fresh, as after a new subscribe


def test_release_users_hands_back_everything_held() -> None:
    order = ChatOrder()
    assert order.admit("alice", event(1, chat="c1"), now=0)
    assert order.admit("alice", event(1, chat="c2"), now=0)
    assert not order.admit("alice", event(5, chat="c1"), now=0)
    assert not order.admit("alice", update(7, "1", chat="c2"), now=0)
    assert versions(order.release_users(["alice", "nobody"])) == [5, 7]
    assert order.held_count == 0


def test_too_many_held_events_release_the_user_at_once() -> None:
    order = ChatOrder(held_per_user=3)
    assert order.admit("alice", event(1), now=0)
    for index in range(4):  # 10, 12, 14, 16: none waits for another
        assert not order.admit("alice", event(10 + 2 * index), now=0)
    assert order.next_deadline() == -math.inf
    released, users = order.expire(now=0)
    assert len(released) == 4
    assert users == ("alice",)


def test_chats_per_user_are_bounded() -> None:
    order = ChatOrder(chats_per_user=2)
    for chat in ("c1", "c2", "c3"):
        assert order.admit("alice", event(1, chat=chat), now=0)
    # c1 was the least recently used and is forgotten: its next event passes at once.
    assert order.admit("alice", event(5, chat="c1"), now=0)
    assert not order.admit("alice", event(5, chat="c3"), now=0)


def test_chat_events_always_pass() -> None:
    order = ChatOrder()
    chat = Chat("c1", ("alice", "bob"), "bob", WHEN)
    assert order.admit("alice", Delivery("chat", ("alice",), chat=chat), now=0)


def test_a_new_chat_holds_its_second_message_until_the_first() -> None:
    """Two nodes' first messages of a new chat race: the chat event says it starts empty."""
    order = ChatOrder()
    order.chat_created(["bob"], "c1")
    assert not order.admit("bob", event(2), now=0)  # bob's own, published locally
    assert order.held_count == 1
    assert order.admit("bob", event(1), now=0.01)  # alice's, through Redis
    assert versions(order.followers("bob", event(1))) == [2]
    assert order.admit("bob", event(3), now=0.02)
    assert order.expire(1.0) == ([], ())  # nothing left to resync


def test_a_new_chat_holds_an_early_update_too() -> None:
    order = ChatOrder()
    order.chat_created(["bob"], "c1")
    assert not order.admit("bob", update(2, "1"), now=0)  # the edit overtook its message
    assert order.admit("bob", event(1), now=0.01)
    assert [e.kind for e in order.followers("bob", event(1))] == ["update"]


def test_a_chat_event_after_its_messages_changes_nothing() -> None:
    order = ChatOrder()
    assert order.admit("bob", event(1), now=0)
    order.chat_created(["bob"], "c1")
    assert order.admit("bob", event(2), now=0)


# --------------------------------------------------------------------------- groups: joins


def test_a_joiner_without_state_gets_the_next_message_at_once() -> None:
    order = ChatOrder()
    order.chat_joined(["carol"], "c1", 7)  # the group was at version 7 when carol joined
    assert order.admit("carol", event(8), now=0)
    assert order.admit("carol", event(9), now=0)
    assert order.held_count == 0


def test_a_joiner_waits_for_a_change_after_the_join_that_is_missing() -> None:
    order = ChatOrder()
    order.chat_joined(["carol"], "c1", 7)
    assert not order.admit("carol", event(9), now=0)  # 8 came after the join: awaited
    assert order.admit("carol", event(8), now=0.01)
    assert versions(order.followers("carol", event(8))) == [9]


def test_a_rejoiner_with_an_older_last_gets_the_next_message_at_once() -> None:
    """Carol had the group up to version 3, was removed (versions 4..9 never reached her),
    and was added again at version 9: her next message follows the join, not her old last."""
    order = ChatOrder()
    assert order.admit("carol", event(3), now=0)
    order.chat_joined(["carol"], "c1", 9)
    assert order.admit("carol", event(10), now=0)
    assert order.held_count == 0
    assert order.admit("carol", update(11, "10"), now=0)
    assert order.expire(now=10) == ([], ())  # nothing waits, nobody is resynced


def test_a_join_never_moves_last_backwards() -> None:
    """A join event that arrives after later changes reached the user (published by another
    node) leaves `last` where it was."""
    order = ChatOrder()
    assert order.admit("carol", event(12), now=0)
    order.chat_joined(["carol"], "c1", 9)
    assert order.admit("carol", event(13), now=0)  # follows 12, not 9
    assert not order.admit("carol", event(15), now=0)  # 14 is awaited, as before
    # A second join event of the same version, or an older one, changes nothing either.
    order.chat_joined(["carol"], "c1", 9)
    order.chat_joined(["carol"], "c1", 13)
    assert order.admit("carol", event(14), now=0)
    assert versions(order.followers("carol", event(14))) == [15]


def test_a_join_at_the_users_last_keeps_it() -> None:
    order = ChatOrder()
    assert order.admit("carol", event(9), now=0)
    order.chat_joined(["carol"], "c1", 9)
    assert order.admit("carol", event(10), now=0)


def test_a_join_concerns_only_its_users_and_its_chat() -> None:
    order = ChatOrder()
    for user in ("carol", "dave"):
        assert order.admit(user, event(3), now=0)
    assert order.admit("carol", event(3, chat="c2"), now=0)
    order.chat_joined(["carol"], "c1", 9)
    assert order.admit("carol", event(10), now=0)
    assert not order.admit("dave", event(10), now=0)  # dave's chain still ends at 3
    assert not order.admit("carol", event(10, chat="c2"), now=0)  # another chat of carol's


def test_a_message_held_before_its_join_event_is_released_by_the_join() -> None:
    """Carol, removed at version 3 and re-added at version 9: the first message after the join
    (version 10, published by another node) can reach this node before the join event. It is
    held (her `last` is 3); the join event makes 9 her last, so it must pass then, not wait
    out the hold and resynchronize her (close her connections)."""
    order = ChatOrder(hold_s=0.25)
    assert order.admit("carol", event(3), now=0)
    assert not order.admit("carol", event(10), now=0)
    order.chat_joined(["carol"], "c1", 9)
    assert order.expire(now=1.0) == ([], ())  # nobody waited for a lost predecessor
    assert order.held_count == 0
