"""Table tests of the Redis bus's loss accounting (pure: no Redis, no clock).

The ledger decides whom a publisher owes a resync notice after events it could not queue or
send; a debt is settled only by notices that were sent, and what is lost while they are out
stays owed. The bus contract suite checks the same through a real Redis.
"""

from __future__ import annotations

from handler.bus import redis_codec
from handler.bus.redis_codec import Channels, Outgoing
from handler.bus.redis_losses import LossLedger

CHANNELS = Channels("t:")
NOTICE = redis_codec.resync_notice("node1")


def ledger(max_users: int = 3) -> LossLedger:
    return LossLedger("node1", CHANNELS, max_users=max_users)


def channels_of(owed_notices: tuple[Outgoing, ...]) -> set[bytes]:
    assert all(n.payload == NOTICE for n in owed_notices)
    return {channel for n in owed_notices for channel in n.channels}


def test_nothing_lost_owes_nothing() -> None:
    owed = ledger().owed()
    assert owed.notices == ()
    assert not owed.everyone


def test_each_user_whose_event_was_lost_is_owed_one_notice_on_its_channel() -> None:
    book = ledger()
    book.lose(["alice", "bob"])
    book.lose(["alice"])
    assert channels_of(book.owed().notices) == {b"t:u:alice", b"t:u:bob"}


def test_a_partly_sent_batch_counts_for_the_users_of_its_user_channels() -> None:
    book = ledger()
    batch = [
        Outgoing((CHANNELS.user("alice"), CHANNELS.node("node2")), b"{}"),
        Outgoing((CHANNELS.user("bob"),), b"{}"),
    ]
    book.lose_batch(batch)
    assert channels_of(book.owed().notices) == {b"t:u:alice", b"t:u:bob"}


def test_past_the_limit_one_notice_to_everyone_replaces_the_names() -> None:
    book = ledger(max_users=3)
    book.lose(["a", "b", "c", "d"])
    owed = book.owed()
    assert owed.everyone
    assert channels_of(owed.notices) == {b"t:all"}
    book.lose(["e"])  # already owed to everyone: nothing more to remember
    assert channels_of(book.owed().notices) == {b"t:all"}


def test_paid_settles_what_the_sent_notices_covered() -> None:
    book = ledger()
    book.lose(["alice"])
    book.paid(book.owed())
    assert book.owed().notices == ()


def test_a_loss_while_the_notices_are_out_stays_owed() -> None:
    book = ledger()
    book.lose(["alice"])
    owed = book.owed()
    book.lose(["bob"])  # lost while the batch with alice's notice was being sent
    book.paid(owed)
    assert channels_of(book.owed().notices) == {b"t:u:bob"}


def test_everyone_stays_owed_when_more_was_lost_during_the_send() -> None:
    book = ledger(max_users=1)
    book.lose(["a", "b"])
    owed = book.owed()
    assert owed.everyone
    book.lose(["c"])
    book.paid(owed)
    assert book.owed().everyone
    book.paid(book.owed())  # a later send with nothing lost meanwhile settles it
    assert not book.owed().everyone
    assert book.owed().notices == ()


def test_everyone_becoming_owed_during_the_send_is_not_settled_by_it() -> None:
    book = ledger(max_users=2)
    book.lose(["a"])
    owed = book.owed()  # owed to a only
    book.lose(["b", "c"])  # past the limit while the notice to a is out
    book.paid(owed)
    assert book.owed().everyone
