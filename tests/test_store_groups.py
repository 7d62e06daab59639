"""The store contract for group chats (`handler.store.base`, `handler.store.groups`), on every
backend.

The backends and fixtures are the contract suite's (`test_store_contract`): each test runs on
SQLite and on PostgreSQL (marked `scale`; skipped, naming `CHAT_TEST_DATABASE_URL`, when it is
unset), every store is opened with a `commits` channel, and the tests read what it handed over.

In these tests alice creates the groups unless a test says otherwise; a member who joins later
sees only what was sent after the join, and every write of a group is decided on its members
in the writer's transaction (`Committed.chat.participants` are the members at commit).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import test_store_contract
import trio
from test_store_contract import (
    TIMEOUT_S,
    TIMESTAMP,
    Handed,
    all_messages,
    deliver,
    expected_view,
    in_one_batch,
    live,
    page_of,
    refused,
    send,
    view_of,
)

from handler.errors import ErrorCode, ProtocolError
from handler.protocol import GROUP, Chat, ChatView, GroupChange, Message
from handler.store import Store
from handler.store.base import NO_ORIGIN, Committed, Origin

# The contract suite's backends and fixtures: SQLite, and PostgreSQL in a fresh schema.
storage_config = test_store_contract.storage_config
handed = test_store_contract.handed
opener = test_store_contract.opener
store = test_store_contract.store

LIMIT = 256


async def new_group(store: Store, creator: str, *members: str, title: str = "Team") -> Chat:
    return await store.create_group(creator, title, list(members))


def handed_to(handed: dict[Store, Handed], store: Store) -> Handed:
    return handed[store]


def zeros(chat: Chat) -> dict[str, int]:
    return dict.fromkeys(chat.participants, 0)


def group_view(
    chat: Chat,
    last: Message | None,
    unread: int,
    read: dict[str, int],
    delivered: dict[str, int],
    joined: dict[str, int] | None = None,
) -> ChatView:
    """`expected_view` of a group: with each member's `joined_seq` (0 unless given)."""
    view = expected_view(chat, last, unread, read, delivered)
    joined = joined or {}
    return attrs.evolve(
        view, joined_seq=tuple((user, joined.get(user, 0)) for user in chat.participants)
    )


def members_changes(commits: Sequence[Committed]) -> list[GroupChange]:
    """`commits`, which must all be changes of members, as their `GroupChange`s."""
    changes = []
    for commit in commits:
        assert commit.group is not None, commit
        assert (commit.message, commit.receipt, commit.update) == (None, None, False)
        assert commit.chat == commit.group.view.chat  # the members after the change
        changes.append(commit.group)
    return changes


def message_commits(commits: Sequence[Committed]) -> list[tuple[Message, tuple[str, ...]]]:
    """Each handed-over new message with the members it was committed among."""
    return [
        (commit.message, commit.chat.participants)
        for commit in commits
        if commit.message is not None and not commit.update
    ]


async def backlog_messages(store: Store, user: str) -> list[tuple[str, list[str]]]:
    backlog = await store.backlog(user)
    return [(chat_id, [m.content for m in batch]) for chat_id, batch in backlog.messages]


async def contents(store: Store, chat: Chat, viewer: str | None = None) -> list[str]:
    page = await store.messages_before(chat.chat_id, None, 1000, viewer)
    assert page is not None
    messages, has_more = page
    assert not has_more
    return [message.content for message in messages]


# --------------------------------------------------------------------------- create_group


async def test_create_group_makes_a_new_group_each_time(
    store: Store, handed: dict[Store, Handed]
) -> None:
    origin = Origin("conn-1", "r-1")
    chat = await store.create_group("carol", "Team \U0001f600", ["bob", "alice"], origin)
    assert chat.participants == ("alice", "bob", "carol")  # sorted, the creator included
    assert (chat.kind, chat.title, chat.created_by) == (GROUP, "Team \U0001f600", "carol")
    assert chat.is_group
    assert TIMESTAMP.match(chat.created_at)
    again = await store.create_group("carol", "Team \U0001f600", ["bob", "alice"])
    assert again.chat_id != chat.chat_id  # not idempotent: every call creates one
    assert again.participants == chat.participants
    assert await store.get_chat(chat.chat_id) == chat
    assert await store.get_chat(again.chat_id) == again
    # Handed over as new chats, the first with its origin.
    commits = handed_to(handed, store).drain()
    assert commits == [Committed(chat, origin), Committed(again, NO_ORIGIN)]
    assert all(commit.group is None and commit.audience is None for commit in commits)


async def test_a_new_group_is_delivered_to_its_creator_and_in_the_members_backlogs(
    store: Store,
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    fresh = group_view(chat, None, 0, zeros(chat), zeros(chat))
    assert fresh == ChatView.fresh(chat)
    for user in chat.participants:
        assert await view_of(store, user, chat) == fresh
    assert (await store.backlog_plan("alice")).chats == ()  # the creator's copy: delivered
    for user in ("bob", "carol"):
        plan = await store.backlog_plan(user)
        assert plan.chats == (fresh,)
        assert plan.message_chats == ()
        assert plan.high_water[chat.chat_id] == (0, 0)
    # Delivering the chat takes it out of the backlog.
    await deliver(store, "bob", chat_ids=[chat.chat_id])
    assert (await store.backlog_plan("bob")).chats == ()
    assert (await store.backlog_plan("carol")).chats == (fresh,)
    # Nobody else sees it.
    assert await store.chat_view(chat.chat_id, "dave") is None
    assert await store.chats_of("dave") == []
    assert (await store.backlog_plan("dave")).chats == ()


async def test_groups_and_direct_chats_list_together_by_activity(store: Store) -> None:
    first = await new_group(store, "alice", "bob")
    direct, _ = await store.create_chat("alice", "bob")
    second = await new_group(store, "bob", "alice", title="Other")
    assert [view.chat_id for view in await store.chats_of("alice")] == [
        second.chat_id,
        direct.chat_id,
        first.chat_id,
    ]
    await send(store, first, "bob", "wake up")
    assert [view.chat_id for view in await store.chats_of("bob")] == [
        first.chat_id,
        second.chat_id,
        direct.chat_id,
    ]
    assert direct.participants == ("alice", "bob")
    assert (direct.kind, direct.title) == ("direct", None)


# --------------------------------------------------------------------------- messages


async def test_a_group_message_has_no_recipient_anywhere(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    handed_to(handed, store).drain()
    message, created = await store.add_message(chat, "bob", "hi all", "c-1")
    assert created
    assert message.recipient_id is None
    assert "recipient_id" not in message.to_wire()
    assert (message.seq, message.version, message.chat_id) == (1, 1, chat.chat_id)
    assert handed_to(handed, store).drain_messages() == [message]
    assert await all_messages(store, chat) == (message,)
    assert await store.add_message(chat, "bob", "again", "c-1") == (message, False)  # a resend
    assert (await view_of(store, "alice", chat)).last_message == message
    for user in ("alice", "carol"):
        backlog = await store.backlog(user)
        assert backlog.messages == ((chat.chat_id, (message,)),)
        assert await store.undelivered(user, chat.chat_id, 0, 1) == (message,)
    edited = await store.edit_message(chat, "bob", message.message_id, "hi everyone")
    assert edited.recipient_id is None
    deleted, _ = await store.delete_message(chat, "bob", message.message_id)
    assert deleted.recipient_id is None
    assert [m.recipient_id for m, _ in handed_to(handed, store).drain_changes()] == [None, None]
    assert (await all_messages(store, chat))[0].recipient_id is None
    # A direct chat's messages keep theirs.
    direct, _ = await store.create_chat("alice", "bob")
    assert (await send(store, direct, "alice")).recipient_id == "bob"


async def test_every_member_gets_a_group_message_in_the_backlog_but_the_sender(
    store: Store,
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    await deliver(store, "bob", chat_ids=[chat.chat_id])
    await deliver(store, "carol", chat_ids=[chat.chat_id])
    a1 = await send(store, chat, "alice", "a1")
    b1 = await send(store, chat, "bob", "b1")
    assert await backlog_messages(store, "alice") == [(chat.chat_id, ["b1"])]
    assert await backlog_messages(store, "bob") == [(chat.chat_id, ["a1"])]
    assert await backlog_messages(store, "carol") == [(chat.chat_id, ["a1", "b1"])]
    await deliver(store, "carol", page_of(a1, b1))
    assert await backlog_messages(store, "carol") == []
    view = await view_of(store, "carol", chat)
    assert view == group_view(
        chat,
        b1,
        2,
        {"alice": 1, "bob": 2, "carol": 0},  # writing reads
        {"alice": 1, "bob": 0, "carol": 2},  # bob's waits for a1 to reach him
    )


async def test_message_commits_carry_the_members_at_commit(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """The chat a caller passes may be stale: the writer reads the members it commits among."""
    stale = await new_group(store, "alice", "bob", "carol")
    m1 = await send(store, stale, "alice", "m1")
    await store.add_members(stale, "alice", ["dave"], LIMIT)
    m2 = await send(store, stale, "alice", "m2")
    await store.remove_member(stale, "alice", "bob")
    m3 = await send(store, stale, "dave", "m3")  # dave was not in `stale`: he is a member now
    assert message_commits(handed_to(handed, store).drain()) == [
        (m1, ("alice", "bob", "carol")),
        (m2, ("alice", "bob", "carol", "dave")),
        (m3, ("alice", "carol", "dave")),
    ]


# --------------------------------------------------------------------------- add_members


async def test_add_members_adds_the_new_ones_and_hands_over_the_change(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob")
    b1 = await send(store, chat, "bob", "b1")
    await send(store, chat, "alice", "a1")
    handed_to(handed, store).drain()
    origin = Origin("conn-2", 7)
    view, changed = await store.add_members(chat, "bob", ["alice", "dave", "carol"], LIMIT, origin)
    assert changed
    after = await store.get_chat(chat.chat_id)
    assert after is not None
    assert after.participants == ("alice", "bob", "carol", "dave")
    assert (after.kind, after.title, after.created_by) == (GROUP, "Team", "alice")
    assert view == await view_of(store, "bob", after)  # the requester's chat object
    (commit,) = handed_to(handed, store).drain()
    assert commit.origin == origin
    (change,) = members_changes([commit])
    assert commit.chat == after
    assert sorted(change.added) == ["carol", "dave"]  # alice was a member already: ignored
    assert change.removed == ()
    assert change.kept == ("alice", "bob")
    assert change.version == 2  # the chat's version at the change: its next change is 3
    # Each user's copy is their chat object now.
    for user in after.participants:
        assert change.view_for(user) == await view_of(store, user, after), user
    # Joiners start with nothing unread and no last message; their marks at the newest seq.
    for user in ("carol", "dave"):
        joined = await view_of(store, user, after)
        assert (joined.last_message, joined.unread_count) == (None, 0)
        assert dict(joined.read_up_to)[user] == 2
        assert dict(joined.delivered_up_to)[user] == 2
        assert dict(joined.joined_seq) == {"alice": 0, "bob": 0, "carol": 2, "dave": 2}
    assert (await view_of(store, "alice", after)).unread_count == 0  # she wrote last
    bobs = await view_of(store, "bob", after)
    assert (bobs.last_message is not None, bobs.unread_count) == (True, 1)
    assert b1.seq == 1


async def test_a_members_change_shows_the_last_message_as_stored(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """The chat object of a change of members (the requester's answer, everyone's
    `chat_updated`) carries the last message exactly as every other read returns it."""
    chat = await new_group(store, "alice", "bob", "carol")
    last = await send(store, chat, "bob", "last \U0001f600 \x00", "c-last")
    handed_to(handed, store).drain()
    view, _ = await store.add_members(chat, "alice", ["dave"], LIMIT)
    assert view.last_message == last
    removed = await store.remove_member(chat, "alice", "carol")
    assert removed.last_message == last
    changes = members_changes(handed_to(handed, store).drain())
    assert [change.view.last_message for change in changes] == [last, last]
    assert changes[0].view_for("bob").last_message == last


async def test_add_members_of_members_only_changes_nothing(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    await send(store, chat, "bob", "b1")
    handed_to(handed, store).drain()
    view, changed = await store.add_members(chat, "carol", ["alice", "bob"], LIMIT)
    assert not changed
    assert view == await view_of(store, "carol", chat)
    assert handed_to(handed, store).drain() == []
    assert await store.get_chat(chat.chat_id) == chat


async def test_a_joiners_backlog_has_only_what_came_after_the_join(store: Store) -> None:
    chat = await new_group(store, "alice", "bob")
    await send(store, chat, "alice", "before 1")
    await send(store, chat, "bob", "before 2")
    await store.add_members(chat, "alice", ["carol"], LIMIT)
    backlog = await store.backlog("carol")
    assert [view.chat_id for view in backlog.chats] == [chat.chat_id]  # the chat, as new
    assert backlog.chats[0].last_message is None
    assert (backlog.messages, backlog.updates) == ((), ())
    plan = await store.backlog_plan("carol")
    assert plan.message_chats == ()
    assert plan.high_water[chat.chat_id] == (2, 2)
    after = await send(store, chat, "bob", "after")
    assert await backlog_messages(store, "carol") == [(chat.chat_id, ["after"])]
    assert await store.undelivered("carol", chat.chat_id, 2, after.seq) == (after,)
    joined = await view_of(store, "carol", (await store.get_chat(chat.chat_id)) or chat)
    assert (joined.last_message, joined.unread_count) == (after, 1)


async def test_a_joiner_pages_only_the_messages_after_the_join(store: Store) -> None:
    chat = await new_group(store, "alice", "bob")
    before = [await send(store, chat, "alice", f"b{n}") for n in range(5)]
    await store.add_members(chat, "alice", ["carol"], LIMIT)
    after = [await send(store, chat, "bob", f"a{n}") for n in range(3)]
    chat_id = chat.chat_id
    assert await store.messages_before(chat_id, None, 10, "carol") == (tuple(after), False)
    assert await store.messages_before(chat_id, None, 3, "carol") == (tuple(after), False)
    assert await store.messages_before(chat_id, None, 2, "carol") == (tuple(after[1:]), True)
    page = await store.messages_before(chat_id, after[1].message_id, 2, "carol")
    assert page == ((after[0],), False)
    assert await store.messages_before(chat_id, after[0].message_id, 2, "carol") == ((), False)
    # A message from before the join is of the chat (not None), but nothing before it is hers.
    assert await store.messages_before(chat_id, before[3].message_id, 2, "carol") == ((), False)
    # The others still page everything.
    everything = (*before, *after)
    assert await store.messages_before(chat_id, None, 10, "alice") == (everything, False)
    assert await store.messages_before(chat_id, None, 10) == (everything, False)
    assert await store.messages_before(chat_id, None, 7, "bob") == (everything[1:], True)
    # A stranger sees nothing.
    assert await store.messages_before(chat_id, None, 10, "zed") == ((), False)


async def test_an_edit_before_the_join_does_not_reach_the_joiner(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob")
    old = await send(store, chat, "bob", "old")
    await store.add_members(chat, "alice", ["carol"], LIMIT)
    new = await send(store, chat, "bob", "new")
    await deliver(store, "carol", live(new))
    handed_to(handed, store).drain()

    old_edited = await store.edit_message(chat, "bob", old.message_id, "old, edited")
    new_edited = await store.edit_message(chat, "bob", new.message_id, "new, edited")
    old_deleted, _ = await store.delete_message(chat, "bob", old.message_id)
    commits = [c for c in handed_to(handed, store).drain() if c.update]
    assert [c.message for c in commits] == [old_edited, new_edited, old_deleted]
    everyone = ("alice", "bob", "carol")
    assert [c.chat.participants for c in commits] == [everyone] * 3
    # A change reaches only the members who had the message.
    assert [c.audience for c in commits] == [("alice", "bob"), everyone, ("alice", "bob")]

    backlog = await store.backlog("carol")
    assert backlog.updates == ((chat.chat_id, (new_edited,)),)
    version = old_deleted.version
    assert await store.updated("carol", chat.chat_id, 0, version, new.seq) == (new_edited,)
    assert await store.updated("alice", chat.chat_id, 0, version, new.seq) == (
        old_deleted,
        new_edited,
    )
    # Carol's page shows only the message she had, in its current state.
    assert await store.messages_before(chat.chat_id, None, 10, "carol") == ((new_edited,), False)


async def test_add_members_refusals_change_nothing(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    handed_to(handed, store).drain()
    # Past the limit (the members already there count, the ones named twice do not).
    with refused(ErrorCode.BAD_REQUEST, "member_ids"):
        await store.add_members(chat, "alice", ["dave", "erin"], 4)
    with refused(ErrorCode.BAD_REQUEST, "member_ids"):
        await store.add_members(chat, "bob", ["bob", "dave", "erin"], 4)
    # Not a member.
    with refused(ErrorCode.FORBIDDEN):
        await store.add_members(chat, "zed", ["dave"], LIMIT)
    assert await store.get_chat(chat.chat_id) == chat
    assert handed_to(handed, store).drain() == []
    assert await store.chat_view(chat.chat_id, "dave") is None
    # Up to the limit exactly is fine, and members named again do not count.
    view, changed = await store.add_members(chat, "carol", ["alice", "dave"], 4)
    assert changed
    assert view.chat.participants == ("alice", "bob", "carol", "dave")
    view, changed = await store.add_members(chat, "dave", ["alice", "bob"], 4)
    assert not changed
    with refused(ErrorCode.BAD_REQUEST, "member_ids"):
        await store.add_members(chat, "dave", ["erin"], 4)


# --------------------------------------------------------------------------- remove_member


async def test_the_creator_removes_a_member(store: Store, handed: dict[Store, Handed]) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    b1 = await send(store, chat, "bob", "b1")
    handed_to(handed, store).drain()
    origin = Origin("conn-3", "rm")
    view = await store.remove_member(chat, "alice", "bob", origin)
    after = await store.get_chat(chat.chat_id)
    assert after is not None
    assert after.participants == ("alice", "carol")
    assert view == await view_of(store, "alice", after)
    assert view.chat == after
    (commit,) = handed_to(handed, store).drain()
    assert commit.origin == origin
    (change,) = members_changes([commit])
    assert (change.added, change.removed, change.kept) == ((), ("bob",), ("alice", "carol"))
    assert change.version == b1.version
    # The removed user's copy no longer lists them, and shows nothing of the chat.
    bobs = change.view_for("bob")
    assert "bob" not in bobs.chat.participants
    assert (bobs.last_message, bobs.unread_count) == (None, 0)
    assert change.view_for("carol") == await view_of(store, "carol", after)

    # From then on the chat is not bob's.
    assert await store.chat_view(chat.chat_id, "bob") is None
    assert [v.chat_id for v in await store.chats_of("bob")] == []
    await send(store, chat, "alice", "after")
    backlog = await store.backlog("bob")
    assert (backlog.chats, backlog.messages, backlog.updates) == ((), (), ())
    assert chat.chat_id not in backlog.high_water


async def test_a_removed_member_can_no_longer_write(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    b1 = await send(store, chat, "bob", "b1")
    await store.remove_member(chat, "alice", "bob")
    handed_to(handed, store).drain()
    with refused(ErrorCode.FORBIDDEN):
        await store.add_message(chat, "bob", "still here?", None)
    with refused(ErrorCode.FORBIDDEN):
        await store.add_message(chat, "bob", "still here?", "c-9")
    with refused(ErrorCode.FORBIDDEN):
        await store.edit_message(chat, "bob", b1.message_id, "edited")
    with refused(ErrorCode.FORBIDDEN):
        await store.delete_message(chat, "bob", b1.message_id)
    with refused(ErrorCode.FORBIDDEN):
        await store.mark_read(chat, "bob", b1.message_id)
    with refused(ErrorCode.FORBIDDEN):
        await store.add_members(chat, "bob", ["dave"], LIMIT)
    with refused(ErrorCode.FORBIDDEN):
        await store.remove_member(chat, "bob", "carol")
    await store.flush()
    assert handed_to(handed, store).drain() == []
    assert await all_messages(store, chat) == (b1,)  # nothing stored, nothing changed
    assert await store.get_chat(chat.chat_id) == Chat(
        chat.chat_id, ("alice", "carol"), "alice", chat.created_at, GROUP, "Team"
    )
    # The next message takes the next seq: nothing was numbered for the refused ones.
    a1 = await send(store, chat, "alice", "a1")
    assert (a1.seq, a1.version) == (2, 2)


async def test_a_member_leaves_and_others_cannot_remove_each_other(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol", "dave")
    handed_to(handed, store).drain()
    with refused(ErrorCode.FORBIDDEN, "user_id"):
        await store.remove_member(chat, "bob", "carol")  # not the creator
    with refused(ErrorCode.FORBIDDEN, "user_id"):
        await store.remove_member(chat, "bob", "alice")  # not even the creator
    with refused(ErrorCode.BAD_REQUEST, "user_id"):
        await store.remove_member(chat, "alice", "zed")  # not a member
    with refused(ErrorCode.FORBIDDEN):
        await store.remove_member(chat, "zed", "zed")  # a stranger
    with refused(ErrorCode.FORBIDDEN):
        await store.remove_member(chat, "zed", "bob")
    assert await store.get_chat(chat.chat_id) == chat
    assert handed_to(handed, store).drain() == []

    view = await store.remove_member(chat, "carol", "carol")  # leaving
    assert view.chat.participants == ("alice", "bob", "dave")
    assert "carol" not in view.chat.participants
    (change,) = members_changes(handed_to(handed, store).drain())
    assert (change.removed, change.kept) == (("carol",), ("alice", "bob", "dave"))
    assert await store.chat_view(chat.chat_id, "carol") is None
    with refused(ErrorCode.BAD_REQUEST, "user_id"):
        await store.remove_member(chat, "alice", "carol")  # gone already
    # The creator may leave too; then nobody removes anyone else, but anyone may leave.
    await store.remove_member(chat, "alice", "alice")
    with refused(ErrorCode.FORBIDDEN, "user_id"):
        await store.remove_member(chat, "bob", "dave")
    await store.remove_member(chat, "dave", "dave")
    after = await store.get_chat(chat.chat_id)
    assert after is not None
    assert (after.participants, after.created_by) == (("bob",), "alice")


async def test_a_member_added_again_sees_only_what_came_after_the_new_join(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    await send(store, chat, "bob", "while a member")
    await store.remove_member(chat, "alice", "bob")
    await send(store, chat, "alice", "while away")
    await store.add_members(chat, "carol", ["bob"], LIMIT)
    handed_to(handed, store).drain()
    back = await send(store, chat, "alice", "back")
    assert await contents(store, chat, "bob") == ["back"]
    assert await backlog_messages(store, "bob") == [(chat.chat_id, ["back"])]
    view = await view_of(store, "bob", (await store.get_chat(chat.chat_id)) or chat)
    assert (view.last_message, view.unread_count) == (back, 1)
    assert dict(view.read_up_to)["bob"] == 2
    # His own old message is not offered as changed either.
    await store.edit_message(chat, "alice", back.message_id, "back, edited")
    assert (await store.backlog("bob")).updates == ()


# --------------------------------------------------------------------------- receipts


async def test_a_read_receipt_concerns_the_reader_and_the_senders_of_what_was_read(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol", "dave", "erin")
    b1 = await send(store, chat, "bob", "b1")
    c1 = await send(store, chat, "carol", "c1")
    b2 = await send(store, chat, "bob", "b2")
    d1 = await send(store, chat, "dave", "d1")
    handed_to(handed, store).drain()

    origin = Origin("conn-4", "mr")
    receipt, moved = await store.mark_read(chat, "alice", c1.message_id, origin)
    assert moved
    assert (receipt.user_id, receipt.kind, receipt.seq) == ("alice", "read", c1.seq)
    (commit,) = handed_to(handed, store).drain()
    assert commit.receipt == receipt
    assert commit.origin == origin
    assert commit.audience == ("alice", "bob", "carol")  # erin wrote nothing: not told

    receipt, moved = await store.mark_read(chat, "alice", d1.message_id)
    assert moved
    (commit,) = handed_to(handed, store).drain()
    assert commit.audience == ("alice", "bob", "dave")  # newly read: b2 and d1

    # A mark that does not move hands nothing over.
    receipt, moved = await store.mark_read(chat, "alice", b1.message_id)
    assert not moved
    assert receipt.seq == d1.seq
    assert handed_to(handed, store).drain() == []

    # The reader's own messages in the range concern nobody else.
    a1 = await send(store, chat, "alice", "a1")
    handed_to(handed, store).drain()
    await store.mark_read(chat, "erin", a1.message_id)
    (commit,) = handed_to(handed, store).drain()
    assert commit.audience == ("erin", "alice", "bob", "carol", "dave")
    await store.mark_read(chat, "alice", a1.message_id)  # moved by her own message already
    assert handed_to(handed, store).drain() == []
    assert b2.seq == 3


async def test_a_delivered_receipt_concerns_the_senders_of_what_was_delivered(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol", "dave", "erin")
    b1 = await send(store, chat, "bob", "b1")
    c1 = await send(store, chat, "carol", "c1")
    b2 = await send(store, chat, "bob", "b2")
    d1 = await send(store, chat, "dave", "d1")
    handed_to(handed, store).drain()

    await deliver(store, "erin", page_of(b1, c1))
    (commit,) = handed_to(handed, store).drain()
    assert commit.receipt is not None
    assert (commit.receipt.user_id, commit.receipt.kind, commit.receipt.seq) == (
        "erin",
        "delivered",
        c1.seq,
    )
    assert commit.audience == ("bob", "carol")  # not erin herself: a delivered mark
    await deliver(store, "erin", live(b2))
    (commit,) = handed_to(handed, store).drain()
    assert commit.audience == ("bob",)
    # Delivered again (a page of history): nothing moves, nothing is handed over.
    await deliver(store, "erin", page_of(b1, c1, b2))
    assert handed_to(handed, store).drain() == []
    await deliver(store, "erin", live(d1))
    (commit,) = handed_to(handed, store).drain()
    assert commit.audience == ("dave",)


async def test_a_page_that_overlaps_what_was_delivered_concerns_only_the_new_senders(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """Alice had b1 and c1; a page carrying b1..d1 (history after a reconnect) delivers only
    d1: the receipt concerns dave, not bob and carol, whose messages she had before."""
    chat = await new_group(store, "alice", "bob", "carol", "dave")
    b1 = await send(store, chat, "bob", "b1")
    c1 = await send(store, chat, "carol", "c1")
    d1 = await send(store, chat, "dave", "d1")
    await deliver(store, "alice", page_of(b1, c1))
    handed_to(handed, store).drain()
    await deliver(store, "alice", page_of(b1, c1, d1))
    (commit,) = handed_to(handed, store).drain()
    assert commit.receipt is not None
    assert (commit.receipt.seq, commit.audience) == (d1.seq, ("dave",))


async def test_a_receipt_never_reaches_a_member_who_left(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """Bob wrote b1 and left; alice and carol then read and receive it. Nothing of the chat
    is pushed to bob any more: he is not among whom their receipts concern."""
    chat = await new_group(store, "alice", "bob", "carol", "dave")
    b1 = await send(store, chat, "bob", "b1")
    d1 = await send(store, chat, "dave", "d1")
    await store.remove_member(chat, "bob", "bob")
    handed_to(handed, store).drain()
    await store.mark_read(chat, "alice", d1.message_id)
    await deliver(store, "carol", page_of(b1, d1))
    read, delivered = handed_to(handed, store).drain()
    assert (read.receipt and read.receipt.kind, read.audience) == ("read", ("alice", "dave"))
    assert (delivered.receipt and delivered.receipt.kind, delivered.audience) == (
        "delivered",
        ("dave",),
    )


async def test_a_group_receipts_audience_comes_from_the_members_at_commit(
    store: Store, handed: dict[Store, Handed]
) -> None:
    """A group's receipt is told to its `audience` alone (the `Committed` contract), decided
    in the writer from the members then: even when the caller's chat object is stale."""
    stale = await new_group(store, "alice", "bob")
    await store.add_members(stale, "alice", ["carol"], LIMIT)
    c1 = await send(store, stale, "carol", "c1")
    handed_to(handed, store).drain()
    await store.mark_read(stale, "alice", c1.message_id)
    await deliver(store, "bob", live(c1))
    commits = handed_to(handed, store).drain()
    assert [c.receipt.kind for c in commits if c.receipt] == ["read", "delivered"]
    assert [c.audience for c in commits] == [("alice", "carol"), ("carol",)]


async def test_receipts_in_a_direct_chat_keep_no_audience(
    store: Store, handed: dict[Store, Handed]
) -> None:
    direct, _ = await store.create_chat("alice", "bob")
    a1 = await send(store, direct, "alice", "a1")
    handed_to(handed, store).drain()
    await deliver(store, "bob", live(a1))
    await store.mark_read(direct, "bob", a1.message_id)
    commits = handed_to(handed, store).drain()
    assert [c.receipt.kind for c in commits if c.receipt] == ["delivered", "read"]
    assert [c.audience for c in commits] == [None, None]  # the participants, as before


# --------------------------------------------------------------------------- one batch


async def test_a_removal_between_two_messages_of_one_batch_splits_their_audiences(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    handed_to(handed, store).drain()
    first, view, second = await in_one_batch(
        store,
        lambda: send(store, chat, "carol", "first"),
        lambda: store.remove_member(chat, "alice", "bob"),
        lambda: send(store, chat, "carol", "second"),
    )
    assert isinstance(view, ChatView)
    assert view.chat.participants == ("alice", "carol")
    commits = handed_to(handed, store).drain()
    assert [c.message or c.group for c in commits] == [first, commits[1].group, second]
    assert message_commits(commits) == [
        (first, ("alice", "bob", "carol")),
        (second, ("alice", "carol")),
    ]
    (change,) = members_changes([commits[1]])
    assert change.removed == ("bob",)
    assert change.version == first.version  # the removal came after the first message
    assert (first.seq, second.seq) == (1, 2)
    assert await backlog_messages(store, "bob") == []
    assert await contents(store, chat) == ["first", "second"]


async def test_a_removed_members_message_later_in_the_same_batch_is_refused(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob", "carol")
    handed_to(handed, store).drain()
    before, _, after, other = await in_one_batch(
        store,
        lambda: send(store, chat, "bob", "before"),
        lambda: store.remove_member(chat, "bob", "bob"),
        lambda: store.add_message(chat, "bob", "after", None),
        lambda: send(store, chat, "carol", "other"),
    )
    assert isinstance(before, Message)
    assert isinstance(after, ProtocolError)
    assert after.code == ErrorCode.FORBIDDEN
    assert isinstance(other, Message)
    assert await contents(store, chat) == ["before", "other"]
    assert (before.seq, other.seq) == (1, 2)
    assert message_commits(handed_to(handed, store).drain()) == [
        (before, ("alice", "bob", "carol")),
        (other, ("alice", "carol")),
    ]


async def test_an_addition_between_two_messages_of_one_batch_joins_between_them(
    store: Store, handed: dict[Store, Handed]
) -> None:
    chat = await new_group(store, "alice", "bob")
    handed_to(handed, store).drain()
    first, (view, changed), second = await in_one_batch(
        store,
        lambda: send(store, chat, "alice", "first"),
        lambda: store.add_members(chat, "bob", ["dave"], LIMIT),
        lambda: send(store, chat, "alice", "second"),
    )
    assert changed
    assert view.chat.participants == ("alice", "bob", "dave")
    commits = handed_to(handed, store).drain()
    assert message_commits(commits) == [
        (first, ("alice", "bob")),
        (second, ("alice", "bob", "dave")),
    ]
    (change,) = members_changes([c for c in commits if c.group is not None])
    assert change.version == first.version
    assert await contents(store, chat, "dave") == ["second"]
    assert await backlog_messages(store, "dave") == [(chat.chat_id, ["second"])]
    joined = await view_of(store, "dave", view.chat)
    assert (joined.last_message, joined.unread_count) == (second, 1)


async def test_concurrent_additions_never_pass_the_limit(store: Store) -> None:
    chat = await new_group(store, "alice", "bob")
    results: list[object] = []

    async def add(user: str) -> None:
        try:
            results.append(await store.add_members(chat, "alice", [user], 4))
        except ProtocolError as error:
            results.append(error)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for user in ("carol", "dave", "erin", "frank"):
                nursery.start_soon(add, user)
    after = await store.get_chat(chat.chat_id)
    assert after is not None
    assert len(after.participants) == 4
    refusals = [r for r in results if isinstance(r, ProtocolError)]
    assert [(r.code, r.field) for r in refusals] == [(ErrorCode.BAD_REQUEST, "member_ids")] * 2
