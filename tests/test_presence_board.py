"""The presence board (`handler.presence.board`): pure tables, no trio, no clock of its own.

The board takes every time as an argument: `now` (monotonic seconds, for the grace) and
`at_ms` (wall-clock epoch ms, what `last_seen` says). Each scenario below is a script of calls
on one fresh board, every call with the exact value it must return, so a scenario reads as
the story of one user (or a few) across the nodes.

`replace` and `drop_node` let several users go in one call, in an order the board does not
promise; the steps that read their results compare them sorted by user.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from functools import reduce

import attrs
import pytest

from handler.presence.board import PresenceBoard, Transition, user_hash

GRACE = 5.0


def on(user_id: str) -> Transition:
    return Transition(user_id, True)


def off(user_id: str, last_seen_ms: int, by: str) -> Transition:
    return Transition(user_id, False, last_seen_ms, by)


def xor(users: Iterable[str]) -> int:
    return reduce(lambda acc, user_id: acc ^ user_hash(user_id), users, 0)


def _sorted(transitions: list[Transition]) -> list[Transition]:
    return sorted(transitions, key=lambda transition: transition.user_id)


@attrs.frozen
class Call:
    """One call on the board; `label` names it in a failure."""

    label: str
    run: Callable[[PresenceBoard], object] = attrs.field(repr=False)

    def __call__(self, board: PresenceBoard) -> object:
        return self.run(board)


def up(node: str, user_id: str) -> Call:
    return Call(f"up({node!r}, {user_id!r})", lambda board: board.up(node, user_id))


def down(node: str, user_id: str, at_ms: int, now: float) -> Call:
    return Call(
        f"down({node!r}, {user_id!r}, {at_ms}, {now})",
        lambda board: board.down(node, user_id, at_ms, now),
    )


def expire(now: float, *, unordered: bool = False) -> Call:
    def run(board: PresenceBoard) -> object:
        gone = board.expire(now)
        return _sorted(gone) if unordered else gone

    return Call(f"expire({now})", run)


def replace(node: str, users: Sequence[str], at_ms: int, now: float) -> Call:
    return Call(
        f"replace({node!r}, {list(users)!r}, {at_ms}, {now})",
        lambda board: _sorted(board.replace(node, users, at_ms, now)),
    )


def drop(node: str, at_ms: int, now: float) -> Call:
    return Call(
        f"drop_node({node!r}, {at_ms}, {now})", lambda board: board.drop_node(node, at_ms, now)
    )


def online(user_id: str) -> Call:
    return Call(f"online({user_id!r})", lambda board: board.online(user_id))


def users_of(node: str) -> Call:
    return Call(f"users_of({node!r})", lambda board: board.users_of(node))


def digest(node: str) -> Call:
    return Call(f"digest({node!r})", lambda board: board.digest(node))


NODES = Call("nodes()", lambda board: board.nodes())
NEXT_DEADLINE = Call("next_deadline()", lambda board: board.next_deadline())

Script = list[tuple[Call, object]]


def run_script(script: Script, grace_s: float = GRACE) -> PresenceBoard:
    board = PresenceBoard(grace_s)
    for step, (call, expected) in enumerate(script):
        actual = call(board)
        assert actual == expected, f"step {step}: {call.label} returned {actual!r}"
    return board


def fs(*items: str) -> frozenset[str]:
    return frozenset(items)


# --------------------------------------------------------------------------- the hash


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        ("alice", 0x4DEAEC0CCE54DA89),
        ("bob", 0x74F32B2BB966A492),
        ("", 0xE4A6A0577479B2B4),
        ("ünï 😀", 0xF84E54F396FAB6D5),
    ],
    ids=["alice", "bob", "empty", "odd-text"],
)
def test_a_user_hash_is_pinned(user_id: str, expected: int) -> None:
    """Every node compares its digests with the others': the hash must not change between
    versions or processes (blake2b, 8 bytes, big-endian, of the UTF-8 id)."""
    assert user_hash(user_id) == expected


def test_a_transition_defaults_to_no_last_seen_and_no_node() -> None:
    assert Transition("alice", True) == Transition("alice", True, None, "")


# --------------------------------------------------------------------------- scripts


def test_a_new_board_is_empty() -> None:
    run_script(
        [
            (online("alice"), False),
            (users_of("n1"), fs()),
            (digest("n1"), (0, 0)),
            (NODES, fs()),
            (NEXT_DEADLINE, None),
            (expire(1e9), []),
            (replace("n1", [], 1000, 10.0), []),
            (drop("n1", 1000, 10.0), None),
            (down("n1", "alice", 1000, 10.0), None),
            (online("alice"), False),
            (NEXT_DEADLINE, None),
        ]
    )


SCRIPTS: dict[str, Script] = {
    "connect-disconnect-one-node": [
        (up("n1", "alice"), on("alice")),
        (online("alice"), True),
        (users_of("n1"), fs("alice")),
        (NODES, fs("n1")),
        (NEXT_DEADLINE, None),
        (down("n1", "alice", 1000, 10.0), None),
        # Gone from the node at once, online for the grace.
        (users_of("n1"), fs()),
        (NODES, fs()),
        (online("alice"), True),
        (NEXT_DEADLINE, 15.0),
        (expire(14.75), []),
        (online("alice"), True),
        (expire(15.0), [off("alice", 1000, "n1")]),  # the deadline itself is the end
        (online("alice"), False),
        (NEXT_DEADLINE, None),
        (expire(100.0), []),  # offline exactly once
        (online("alice"), False),
    ],
    "late-expire-still-reports-once": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (expire(1e9), [off("alice", 1000, "n1")]),
        (expire(1e9), []),
    ],
    "two-nodes-online-while-either-has-the-user": [
        (up("n1", "alice"), on("alice")),
        (up("n2", "alice"), None),  # already online: nobody is told again
        (NODES, fs("n1", "n2")),
        (down("n1", "alice", 1000, 10.0), None),
        (online("alice"), True),
        (NEXT_DEADLINE, None),  # n2 still has her: no grace runs
        (expire(1e9), []),
        (users_of("n1"), fs()),
        (users_of("n2"), fs("alice")),
        (NODES, fs("n2")),
        (down("n2", "alice", 2000, 20.0), None),
        (online("alice"), True),
        (NEXT_DEADLINE, 25.0),
        (expire(24.5), []),
        # The last node to let her go is the one named, with its time.
        (expire(25.0), [off("alice", 2000, "n2")]),
        (online("alice"), False),
    ],
    "two-nodes-leaving-in-the-other-order": [
        (up("n1", "alice"), on("alice")),
        (up("n2", "alice"), None),
        (down("n2", "alice", 1000, 10.0), None),
        (down("n1", "alice", 2000, 11.0), None),
        (NEXT_DEADLINE, 16.0),
        (expire(16.0), [off("alice", 2000, "n1")]),
    ],
    "reconnect-within-the-grace-same-node": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (up("n1", "alice"), None),  # no online re-announcement
        (NEXT_DEADLINE, None),
        (expire(1e9), []),  # and no offline
        (online("alice"), True),
        (users_of("n1"), fs("alice")),
    ],
    "reconnect-within-the-grace-other-node": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (up("n2", "alice"), None),
        (NEXT_DEADLINE, None),
        (expire(1e9), []),
        (online("alice"), True),
        (users_of("n1"), fs()),
        (users_of("n2"), fs("alice")),
        (NODES, fs("n2")),
    ],
    "reconnect-at-the-last-moment-of-the-grace": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (expire(14.75), []),
        (up("n1", "alice"), None),
        (expire(15.0), []),
    ],
    "leaving-again-restarts-the-grace": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (up("n2", "alice"), None),
        (down("n2", "alice", 3000, 13.0), None),
        (NEXT_DEADLINE, 18.0),
        (expire(15.0), []),  # the first grace no longer counts
        (online("alice"), True),
        (expire(18.0), [off("alice", 3000, "n2")]),
    ],
    "reconnect-after-the-grace-is-online-again": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (expire(15.0), [off("alice", 1000, "n1")]),
        (up("n2", "alice"), on("alice")),
        (online("alice"), True),
    ],
    "offline-before-expire-is-called-is-still-online": [
        # The board reports nothing by itself: past the deadline, still online until expire.
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (online("alice"), True),
        (up("n1", "alice"), None),
        (expire(1e9), []),
    ],
    "repeated-up-is-a-no-op": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "alice"), None),
        (up("n1", "alice"), None),
        (users_of("n1"), fs("alice")),
        (digest("n1"), (1, user_hash("alice"))),
        (down("n1", "alice", 1000, 10.0), None),  # one down undoes any number of ups
        (users_of("n1"), fs()),
        (digest("n1"), (0, 0)),
        (expire(15.0), [off("alice", 1000, "n1")]),
    ],
    "repeated-down-keeps-the-first-grace": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (down("n1", "alice", 2000, 12.0), None),
        (NEXT_DEADLINE, 15.0),
        (digest("n1"), (0, 0)),
        (expire(15.0), [off("alice", 1000, "n1")]),
        (down("n1", "alice", 3000, 20.0), None),
        (NEXT_DEADLINE, None),
        (expire(1e9), []),
    ],
    "down-from-a-node-that-never-had-the-user": [
        (up("n1", "alice"), on("alice")),
        (down("n2", "alice", 1000, 10.0), None),
        (NEXT_DEADLINE, None),
        (users_of("n1"), fs("alice")),
        (users_of("n2"), fs()),
        (digest("n2"), (0, 0)),
        (down("n1", "bob", 1000, 10.0), None),  # nor a user nobody has
        (online("bob"), False),
        (NEXT_DEADLINE, None),
        (expire(1e9), []),
    ],
    "graces-end-in-the-order-users-left": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (up("n2", "carol"), on("carol")),
        (up("n2", "dave"), on("dave")),
        (down("n1", "bob", 1000, 10.0), None),
        (down("n2", "dave", 1250, 10.25), None),
        (down("n1", "alice", 1500, 10.5), None),
        (down("n2", "carol", 1500, 10.5), None),
        (NEXT_DEADLINE, 15.0),
        (expire(15.0), [off("bob", 1000, "n1")]),
        (NEXT_DEADLINE, 15.25),
        (
            expire(16.0),
            [off("dave", 1250, "n2"), off("alice", 1500, "n1"), off("carol", 1500, "n2")],
        ),
        (NEXT_DEADLINE, None),
    ],
    "a-reconnect-in-the-middle-of-the-graces": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (up("n1", "carol"), on("carol")),
        (down("n1", "alice", 1000, 10.0), None),
        (down("n1", "bob", 1100, 11.0), None),
        (down("n1", "carol", 1200, 12.0), None),
        (up("n2", "bob"), None),
        (NEXT_DEADLINE, 15.0),
        (expire(1e9), [off("alice", 1000, "n1"), off("carol", 1200, "n1")]),
        (online("bob"), True),
    ],
    "a-reconnect-of-the-first-to-leave-moves-the-next-deadline": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (down("n1", "alice", 1000, 10.0), None),
        (down("n1", "bob", 1100, 11.0), None),
        (up("n1", "alice"), None),
        (NEXT_DEADLINE, 16.0),
        (down("n1", "alice", 1200, 12.0), None),  # now behind bob
        (NEXT_DEADLINE, 16.0),
        (expire(16.0), [off("bob", 1100, "n1")]),
        (NEXT_DEADLINE, 17.0),
        (expire(17.0), [off("alice", 1200, "n1")]),
    ],
    "users-are-independent": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (down("n1", "alice", 1000, 10.0), None),
        (online("bob"), True),
        (users_of("n1"), fs("bob")),
        (NODES, fs("n1")),
        (expire(15.0), [off("alice", 1000, "n1")]),
        (online("bob"), True),
    ],
    "odd-user-ids": [
        (up("n1", "ünï 😀"), on("ünï 😀")),
        (up("n1", ""), on("")),
        (digest("n1"), (2, user_hash("ünï 😀") ^ user_hash(""))),
        (down("n1", "ünï 😀", 1000, 10.0), None),
        (expire(15.0), [off("ünï 😀", 1000, "n1")]),
        (online(""), True),
    ],
    # ------------------------------------------------------------------ replace
    "replace-on-an-unknown-node-adds-its-users": [
        (up("n1", "alice"), on("alice")),
        # Only those nobody had are announced; alice was online through n1.
        (replace("n2", ["alice", "bob", "carol"], 1000, 10.0), [on("bob"), on("carol")]),
        (users_of("n2"), fs("alice", "bob", "carol")),
        (digest("n2"), (3, xor(["alice", "bob", "carol"]))),
        (NODES, fs("n1", "n2")),
        (NEXT_DEADLINE, None),
    ],
    "replace-removes-and-adds": [
        (up("n2", "alice"), on("alice")),
        (up("n2", "bob"), on("bob")),
        (up("n2", "carol"), on("carol")),
        (up("n1", "alice"), None),
        (replace("n2", ["bob", "dave"], 5000, 10.0), [on("dave")]),
        (users_of("n2"), fs("bob", "dave")),
        (digest("n2"), (2, xor(["bob", "dave"]))),
        # Those let go get the grace like any other leave; alice is still on n1.
        (online("alice"), True),
        (online("carol"), True),
        (NEXT_DEADLINE, 15.0),
        (expire(15.0), [off("carol", 5000, "n2")]),
        (online("alice"), True),
        (online("carol"), False),
        (users_of("n1"), fs("alice")),
    ],
    "replace-with-the-same-set-changes-nothing": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (replace("n1", ["bob", "alice"], 5000, 10.0), []),
        (replace("n1", ("alice", "bob", "alice"), 5000, 10.0), []),
        (users_of("n1"), fs("alice", "bob")),
        (NEXT_DEADLINE, None),
        (expire(1e9), []),
    ],
    "replace-with-nothing-lets-everyone-go": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (replace("n1", [], 5000, 10.0), []),
        (users_of("n1"), fs()),
        (digest("n1"), (0, 0)),
        (NODES, fs()),
        (online("alice"), True),
        (online("bob"), True),
        (expire(15.0, unordered=True), [off("alice", 5000, "n1"), off("bob", 5000, "n1")]),
        (replace("n1", [], 6000, 20.0), []),
        (expire(1e9), []),
    ],
    "replace-brings-back-a-user-in-the-grace": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (replace("n2", ["alice"], 1500, 11.0), []),  # no re-announcement
        (NEXT_DEADLINE, None),
        (expire(1e9), []),
        (online("alice"), True),
    ],
    "replace-counts-a-repeated-user-once": [
        (replace("n1", ["alice", "alice", "bob"], 1000, 10.0), [on("alice"), on("bob")]),
        (digest("n1"), (2, xor(["alice", "bob"]))),
    ],
    "replace-after-an-offline-announces-again": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (expire(15.0), [off("alice", 1000, "n1")]),
        (replace("n1", ["alice"], 2000, 20.0), [on("alice")]),
    ],
    "replace-is-idempotent": [
        (replace("n1", ["alice", "bob"], 1000, 10.0), [on("alice"), on("bob")]),
        (replace("n1", ["alice", "bob"], 2000, 11.0), []),
        (replace("n1", ["alice"], 3000, 12.0), []),
        (replace("n1", ["alice"], 4000, 13.0), []),
        (NEXT_DEADLINE, 17.0),  # the first let-go counts
        (expire(17.0), [off("bob", 3000, "n1")]),
    ],
    "replace-leaves-the-other-nodes-alone": [
        (up("n1", "alice"), on("alice")),
        (up("n2", "bob"), on("bob")),
        (replace("n2", ["carol"], 1000, 10.0), [on("carol")]),
        (users_of("n1"), fs("alice")),
        (digest("n1"), (1, user_hash("alice"))),
        (expire(15.0), [off("bob", 1000, "n2")]),
    ],
    # ------------------------------------------------------------------ drop_node
    "drop-node-lets-its-users-go": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (up("n2", "bob"), None),
        (drop("n1", 7000, 10.0), None),
        (NODES, fs("n2")),
        (users_of("n1"), fs()),
        (digest("n1"), (0, 0)),
        (online("alice"), True),  # the grace, as for a leave
        (online("bob"), True),
        (NEXT_DEADLINE, 15.0),
        (expire(15.0), [off("alice", 7000, "n1")]),  # named: a live node writes last_seen
        (online("alice"), False),
        (online("bob"), True),
        (users_of("n2"), fs("bob")),
    ],
    "drop-node-with-several-users-all-expire-together": [
        (
            replace("n1", ["alice", "bob", "carol"], 1000, 1.0),
            [on("alice"), on("bob"), on("carol")],
        ),
        (drop("n1", 7000, 10.0), None),
        (
            expire(15.0, unordered=True),
            [off("alice", 7000, "n1"), off("bob", 7000, "n1"), off("carol", 7000, "n1")],
        ),
    ],
    "drop-node-keeps-a-grace-already-running": [
        (up("n1", "alice"), on("alice")),
        (down("n1", "alice", 1000, 10.0), None),
        (drop("n1", 7000, 12.0), None),
        (NEXT_DEADLINE, 15.0),
        (expire(15.0), [off("alice", 1000, "n1")]),
    ],
    "drop-node-twice-and-unknown-node": [
        (up("n1", "alice"), on("alice")),
        (drop("n1", 7000, 10.0), None),
        (drop("n1", 8000, 12.0), None),
        (drop("n9", 8000, 12.0), None),
        (NEXT_DEADLINE, 15.0),
        (expire(15.0), [off("alice", 7000, "n1")]),
        (expire(1e9), []),
    ],
    "a-dropped-node-that-comes-back-within-the-grace": [
        (up("n1", "alice"), on("alice")),
        (drop("n1", 7000, 10.0), None),
        (up("n1", "alice"), None),
        (NODES, fs("n1")),
        (digest("n1"), (1, user_hash("alice"))),
        (expire(1e9), []),
    ],
    "a-dropped-node-that-comes-back-with-a-full-copy": [
        (up("n1", "alice"), on("alice")),
        (up("n1", "bob"), on("bob")),
        (drop("n1", 7000, 10.0), None),
        (replace("n1", ["bob", "carol"], 8000, 11.0), [on("carol")]),
        (expire(1e9), [off("alice", 7000, "n1")]),
        (users_of("n1"), fs("bob", "carol")),
    ],
}


@pytest.mark.parametrize("script", list(SCRIPTS.values()), ids=list(SCRIPTS))
def test_a_script_of_calls(script: Script) -> None:
    run_script(script)


@pytest.mark.parametrize("grace_s", [0.0, 0.25, 5.0, 30.0])
def test_the_grace_lasts_exactly_its_length(grace_s: float) -> None:
    board = run_script(
        [
            (up("n1", "alice"), on("alice")),
            (down("n1", "alice", 1000, 100.0), None),
            (NEXT_DEADLINE, 100.0 + grace_s),
            (expire(99.0), []),
        ],
        grace_s,
    )
    if grace_s:
        assert board.expire(100.0 + grace_s / 2) == []
        assert board.online("alice") is True
    assert board.expire(100.0 + grace_s) == [off("alice", 1000, "n1")]
    assert board.online("alice") is False


# --------------------------------------------------------------------------- digests


USERS = ("alice", "bob", "carol", "ünï 😀")


@pytest.mark.parametrize("order", list(itertools.permutations(USERS)), ids=str)
def test_a_digest_does_not_depend_on_the_order_of_arrival(order: tuple[str, ...]) -> None:
    board = PresenceBoard(GRACE)
    for user_id in USERS:
        board.up("n1", user_id)
    for user_id in order:
        board.up("n2", user_id)
    other = PresenceBoard(GRACE)
    other.replace("n1", order, 1000, 10.0)
    expected = (4, xor(USERS))
    assert board.digest("n1") == board.digest("n2") == other.digest("n1") == expected


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((), ("alice",)),
        (("alice",), ("bob",)),
        (("alice", "bob"), ("alice",)),
        (("alice", "bob"), ("alice", "carol")),
        (("alice", "bob", "carol"), ("alice", "bob", "ünï 😀")),
        (("alice",), ("alice ",)),
        (("ab",), ("a", "b")),
    ],
    ids=[
        "empty-and-one",
        "one-each",
        "one-more",
        "one-swapped",
        "odd-text",
        "trailing-space",
        "split-id",
    ],
)
def test_a_digest_differs_for_different_contents(
    first: tuple[str, ...], second: tuple[str, ...]
) -> None:
    board = PresenceBoard(GRACE)
    board.replace("n1", first, 1000, 10.0)
    board.replace("n2", second, 1000, 10.0)
    assert board.digest("n1") == (len(first), xor(first))
    assert board.digest("n2") == (len(second), xor(second))
    assert board.digest("n1") != board.digest("n2")


@pytest.mark.parametrize(
    "remove",
    [
        lambda board: [board.down("n1", u, 2000, 11.0) for u in ("bob", "carol")],
        lambda board: board.replace("n1", ["alice"], 2000, 11.0),
        lambda board: [board.down("n1", u, 2000, 11.0) for u in ("carol", "bob", "bob")],
    ],
    ids=["down", "replace", "down-other-order-and-again"],
)
def test_a_digest_returns_to_its_value_after_the_additions_are_removed(
    remove: Callable[[PresenceBoard], object],
) -> None:
    board = PresenceBoard(GRACE)
    board.up("n1", "alice")
    before = board.digest("n1")
    assert before == (1, user_hash("alice"))
    board.up("n1", "bob")
    board.up("n1", "carol")
    assert board.digest("n1") == (3, xor(["alice", "bob", "carol"]))
    remove(board)
    assert board.digest("n1") == before
    # The grace and its end change no node's digest.
    assert _sorted(board.expire(1e9)) == [off("bob", 2000, "n1"), off("carol", 2000, "n1")]
    assert board.digest("n1") == before


def test_a_digest_is_per_node_and_ignores_the_grace() -> None:
    board = PresenceBoard(GRACE)
    board.up("n1", "alice")
    board.up("n2", "alice")
    board.up("n2", "bob")
    assert board.digest("n1") == (1, user_hash("alice"))
    assert board.digest("n2") == (2, xor(["alice", "bob"]))
    board.down("n2", "bob", 1000, 10.0)  # bob is in his grace: on no node
    assert board.online("bob") is True
    assert board.digest("n2") == (1, user_hash("alice"))
    board.drop_node("n1", 2000, 11.0)
    assert board.digest("n1") == (0, 0)
    assert board.digest("n2") == (1, user_hash("alice"))
    assert board.digest("n3") == (0, 0)
    assert board.nodes() == fs("n2")


def test_emptying_a_node_leaves_it_out_of_the_nodes() -> None:
    board = PresenceBoard(GRACE)
    board.up("n1", "alice")
    board.up("n2", "bob")
    board.down("n1", "alice", 1000, 10.0)
    assert board.nodes() == fs("n2")
    assert board.digest("n1") == (0, 0)
    assert board.users_of("n1") == fs()
