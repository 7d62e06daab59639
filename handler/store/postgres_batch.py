"""PostgreSQL's side of the group-commit writer: the write operations, the SQL that applies a
batch of them in one transaction, and the policy for a batch that fails (retry or replay).

Everything here runs in the writer's worker thread (`group_commit.WorkerThread`); the Trio
side, the queue and the hand-off of what was created, is `group_commit.GroupCommitWriter`'s.

- A batch is applied in bulk phases (`apply_batch`): new chat pairs, then the chat rows it
  writes to, locked (`SELECT ... FOR UPDATE`), then the messages (one pipelined insert), then
  the delivery marks. The chat lock serializes writers of a chat across processes, so per chat
  ids and timestamps (the database clock, clamped to the chat's last message) follow commit
  order, and each new message learns the id of the chat's previous one
  (`chats.last_message_id`, read under that lock), which it hands over in its `Committed`.
  Every batch takes its locks in one global order (new chat pairs sorted, then chat rows by
  id, then message rows by id), so two processes' batches cannot deadlock.
- `BatchCommitter` wraps it in BEGIN/COMMIT and decides what a failure means: a deadlock or
  serialization failure is retried whole, as is a batch whose connection broke before COMMIT
  was sent; a batch that fails on one operation's data is replayed one operation per
  transaction, so one bad operation does not fail its neighbours; anything else fails the
  batch and is reported as the database's `write_failure`. Nothing is reported committed
  that was not.
- `content` and `client_message_id` are stored as UTF-8 BYTEA: PostgreSQL text cannot hold
  U+0000, and the protocol returns content exactly as sent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Final

import attrs
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow

from handler.errors import StoreUnavailable
from handler.protocol import Chat, Message, ReceiptFrame
from handler.store import blocks, groups
from handler.store.base import Committed
from handler.store.group_commit import Op
from handler.store.outbox import Outbox
from handler.store.postgres_connect import (
    Connection,
    Connector,
    close_quietly,
    describe,
    usable,
)
from handler.store.rows import CHAT_COLUMNS, CHAT_WIDTH, MESSAGE_COLUMNS, chat_of, message_of
from handler.store.sql_store import (
    BlockRequest,
    Change,
    Delivered,
    Dialect,
    MembersChange,
    NewChat,
    NewGroup,
    NewMessage,
    ReadMark,
    change_refused,
    not_in_chat,
    read_answer,
)
from handler.timefmt import format_ms, now_ms

_BATCH_RETRIES: Final = 5
_NOW_MS: Final = "floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
_PIPELINE: Final = psycopg.Pipeline.is_supported()
# Retried whole: nothing was committed and the same batch can succeed on a second try.
_TRANSIENT: Final = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# Likely caused by one operation's data: the batch is replayed one operation per transaction.
_OP_SPECIFIC: Final = (psycopg.DataError, psycopg.IntegrityError)


def encode(text: str) -> bytes:
    """UTF-8 for BYTEA columns; surrogatepass so any Python string round-trips exactly."""
    return text.encode("utf-8", "surrogatepass")


def decode(data: bytes) -> str:
    """The inverse of `encode`, for what the BYTEA columns return."""
    return bytes(data).decode("utf-8", "surrogatepass")


# The shared write statements, in psycopg's style (and its rows' text decoded, for the group
# state a membership change hands over).
_SQL: Final = Dialect(pyformat=True, text=decode)


def _returned_id(cursor: psycopg.Cursor[TupleRow]) -> int:
    row = cursor.fetchone()
    if row is None:  # pragma: no cover - INSERT ... RETURNING always returns its row
        raise psycopg.InterfaceError("INSERT returned no id")
    return int(row[0])


# --------------------------------------------------------------------------- operations
# A bare `Op` writes nothing but commits in queue order (`flush`).


@attrs.define(eq=False)
class Probe(Op):
    """A write that changes nothing but needs the database to write (the health check)."""


@attrs.define(eq=False)
class CreateChat(Op):
    new: NewChat


@attrs.define(eq=False)
class CreateGroup(Op):
    new: NewGroup


@attrs.define(eq=False)
class ChangeMembers(Op):
    """Applied on its own, between the ops queued before and after it (`apply_batch`)."""

    change: MembersChange


@attrs.define(eq=False)
class SetBlock(Op):
    """Applied on its own, like `ChangeMembers` (it writes the pair's chat row)."""

    request: BlockRequest


@attrs.define(eq=False)
class SaveLastSeen(Op):
    entries: tuple[tuple[str, int], ...]


@attrs.define(eq=False)
class AddMessage(Op):
    new: NewMessage


@attrs.define(eq=False)
class ChangeMessage(Op):
    change: Change


@attrs.define(eq=False)
class MoveReadMark(Op):
    mark: ReadMark


@attrs.define(eq=False)
class MarkDelivered(Op):
    delivered: Delivered


# --------------------------------------------------------------------------- the batch SQL


@attrs.define
class _Locked:
    """A chat row locked for the batch: its state, advanced as the batch writes to it."""

    chat: Chat
    last_ms: int
    last_id: int | None
    last_seq: int
    version: int
    version_changed: bool = False
    members: dict[str, int] | None = None  # a group's, with the seq each joined at
    blocked: bool = False  # a direct chat whose pair has a block in place


def apply_batch(connection: Connection, batch: Sequence[Op]) -> None:
    """Run every operation of `batch` in the current transaction.

    A change of a group's members is applied on its own, after the ops queued before it and
    before those queued after it, so each message reaches exactly the members of the moment
    it was queued in. The ops between them are applied together, in lock order (`_apply`).
    Raises on any database error; the caller decides between retry, replay and failure.
    """
    for op in batch:
        op.reset()
    _lock_pairs(connection.cursor(), batch)
    together: list[Op] = []
    for op in batch:
        if isinstance(op, ChangeMembers | SetBlock | SaveLastSeen):
            if together:
                _apply(connection, together)
                together = []
            _apply_alone(connection, op)
        else:
            together.append(op)
    if together:
        _apply(connection, together)


def _apply_alone(connection: Connection, op: ChangeMembers | SetBlock | SaveLastSeen) -> None:
    if isinstance(op, ChangeMembers):
        _change_members(connection, op)
        return
    cursor = connection.cursor()
    if isinstance(op, SaveLastSeen):
        blocks.save_last_seen(cursor, _SQL, op.entries, greatest="GREATEST")
        return
    op.result, op.committed = blocks.set_block(cursor, _SQL, op.request, now_ms())


def _lock_pairs(cursor: psycopg.Cursor[TupleRow], batch: Sequence[Op]) -> None:
    """Serialize a block with the creation of the pair's chat (across processes): neither may
    miss the other's commit under READ COMMITTED. Every pair of the batch is locked before
    anything else, in sorted order, so batches of two processes cannot deadlock on them
    whatever their order of ops. User ids hold no control characters, so the newline cannot
    join two pairs alike."""
    pairs = {
        "\n".join(sorted((op.request.blocker, op.request.blocked)))
        for op in batch
        if isinstance(op, SetBlock)
    } | {f"{op.new.user_a}\n{op.new.user_b}" for op in batch if isinstance(op, CreateChat)}
    for pair in sorted(pairs):
        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (pair,))


def _change_members(connection: Connection, op: ChangeMembers) -> None:
    cursor = connection.cursor()
    row = cursor.execute(
        f"SELECT last_seq, version, {_NOW_MS} FROM chats WHERE id = %s FOR UPDATE",
        (op.change.chat_row,),
    ).fetchone()
    if row is None:
        op.result = groups.not_a_member()
        return
    last_seq, version, now = row
    op.result, op.committed = groups.change_members(cursor, _SQL, op.change, last_seq, version, now)


def _apply(connection: Connection, batch: Sequence[Op]) -> None:
    """Ops of any kind but `ChangeMembers`, in bulk phases (see the module docstring)."""
    cursor = connection.cursor()
    creates = sorted(
        (op for op in batch if isinstance(op, CreateChat)),
        key=lambda op: (op.new.user_a, op.new.user_b),
    )
    new_groups = [op for op in batch if isinstance(op, CreateGroup)]
    adds = [op for op in batch if isinstance(op, AddMessage)]
    changes = [op for op in batch if isinstance(op, ChangeMessage)]
    reads = [op for op in batch if isinstance(op, MoveReadMark)]
    marks = [op for op in batch if isinstance(op, MarkDelivered)]
    if any(isinstance(op, Probe) for op in batch):
        cursor.execute("UPDATE schema_version SET version = version")

    # 1. New chat pairs, in sorted order (the first lock class).
    for create in creates:
        _create_chat(cursor, create)
    for new_group in new_groups:  # rows nobody else can know yet: no lock order to keep
        _create_group(cursor, new_group)

    # 2. Chat rows, ascending (the second lock class): serializes writers of a chat across
    #    processes (members' rows are only written under their chat's lock), and gives each
    #    chat's state: its last message (time, to clamp new timestamps to), its seq and version
    #    counters.
    lock_rows = sorted(
        {op.new.chat_row for op in adds}
        | {op.change.chat_row for op in changes}
        | {op.mark.chat_row for op in reads}
        | {row for op in marks for row in op.delivered.chat_rows}
        | {mark[0] for op in marks for mark in op.delivered.marks}
    )
    locked: dict[int, _Locked] = {}
    now = 0
    if lock_rows:
        for row in cursor.execute(
            f"SELECT {CHAT_COLUMNS}, last_message_ms, last_message_id, last_seq, version,"
            f" blocked, {_NOW_MS} FROM chats WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            (lock_rows,),
        ):
            last_ms, last_id, last_seq, version, blocked, clock = row[CHAT_WIDTH:]
            locked[row[0]] = _Locked(
                chat_of(row), last_ms, last_id, last_seq, version, blocked=bool(blocked)
            )
            now = max(now, clock)
        _load_members(
            cursor,
            locked,
            {op.new.chat_row for op in adds} | {op.change.chat_row for op in changes},
        )

    # 3. Versions, in batch order (the order the commits are handed over in): new messages
    #    (idempotent resends excepted) and the changes that are allowed.
    inserts, resends = _plan_inserts(cursor, adds, locked, now)
    allowed = _check_changes(cursor, changes, locked)
    versioned: list[tuple[Op, _Locked]] = [
        (op, locked[op.new.chat_row] if isinstance(op, AddMessage) else locked[op.change.chat_row])
        for op in batch
        if (isinstance(op, AddMessage) and op in inserts)
        or (isinstance(op, ChangeMessage) and op in allowed)
    ]
    positions: dict[int, tuple[int, int]] = {}  # id(op) -> (seq, version)
    for op, state in versioned:
        state.version += 1
        seq = 0
        if isinstance(op, AddMessage):
            state.last_seq += 1
            seq = state.last_seq
        else:
            state.version_changed = True
        positions[id(op)] = (seq, state.version)

    # 4. Writes. Marks first: a mark never names a message of its own batch (a client learns
    #    of a message once it is committed), and a mark queued before a user's own message
    #    must count when that message moves the sender's marks. Then messages, then changes.
    #    (On a cursor of their own: the message inserts read their results set by set.)
    marks_cursor = connection.cursor()
    for read in reads:
        _move_read_mark(marks_cursor, read, now)
    for mark in marks:
        _record_delivered(marks_cursor, mark, locked, now)
    _insert_messages(cursor, inserts, locked, positions)
    for resend, original in resends:
        resend.result = (original.result[0], False)
    for op in allowed:
        _apply_change(cursor, op, locked[op.change.chat_row], positions[id(op)][1], now)
    _repeated_deletes(changes)
    changed_chats = [(state.version, row) for row, state in locked.items() if state.version_changed]
    if changed_chats:
        cursor.executemany(
            "UPDATE chats SET version = GREATEST(version, %s) WHERE id = %s", changed_chats
        )


def _load_members(
    cursor: psycopg.Cursor[TupleRow], locked: dict[int, _Locked], rows: set[int]
) -> None:
    """The members of the locked groups that messages or changes are written to."""
    group_rows = sorted(row for row in rows if row in locked and locked[row].chat.is_group)
    if not group_rows:
        return
    members: dict[int, dict[str, int]] = {row: {} for row in group_rows}
    for chat_row, user, joined in cursor.execute(
        "SELECT chat_id, user_id, joined_seq FROM members WHERE chat_id = ANY(%s)"
        " ORDER BY chat_id, user_id",
        (group_rows,),
    ):
        members[chat_row][user] = joined
    for chat_row, group in members.items():
        state = locked[chat_row]
        state.members = group
        state.chat = groups.with_members(state.chat, group)


def _create_group(cursor: psycopg.Cursor[TupleRow], op: CreateGroup) -> None:
    new = op.new
    row = cursor.execute(
        f"INSERT INTO chats (created_by, created_at_ms, last_activity_ms, kind, title)"
        f" SELECT %s, t.now, t.now, 'group', %s FROM (SELECT {_NOW_MS} AS now) t"
        f" RETURNING {CHAT_COLUMNS}",
        (new.creator_id, new.title),
    ).fetchone()
    assert row is not None  # INSERT ... RETURNING returns its row
    groups.insert_members(cursor, _SQL, row[0], new.creator_id, new.member_ids)
    chat = chat_of(row, (new.creator_id, *new.member_ids))
    op.result = chat
    op.committed = Committed(chat, new.origin)


def _create_chat(cursor: psycopg.Cursor[TupleRow], create: CreateChat) -> None:
    new = create.new
    creator = new.creator_id
    if blocks.block_between(cursor, _SQL, new.user_a, new.user_b):
        create.result = blocks.refused()
        return
    row = cursor.execute(
        f"INSERT INTO chats (user_a, user_b, created_by, created_at_ms, last_activity_ms,"
        f" a_delivered, b_delivered) SELECT %s, %s, %s, t.now, t.now, %s, %s"
        f" FROM (SELECT {_NOW_MS} AS now) t ON CONFLICT (user_a, user_b) DO NOTHING"
        f" RETURNING {CHAT_COLUMNS}",
        (new.user_a, new.user_b, creator, new.user_a == creator, new.user_b == creator),
    ).fetchone()
    if row is not None:
        chat = chat_of(row)
        cursor.executemany(
            _SQL.sql("add_member"),
            [
                {"chat": row[0], "user": user, "delivered": int(user == creator)}
                for user in chat.participants
            ],
        )
        create.result = (chat, True)
        create.committed = Committed(chat, new.origin)
        return
    row = cursor.execute(
        f"SELECT {CHAT_COLUMNS} FROM chats WHERE user_a = %s AND user_b = %s",
        (new.user_a, new.user_b),
    ).fetchone()
    assert row is not None  # ON CONFLICT saw a committed or own row
    create.result = (chat_of(row), False)


def _plan_inserts(
    cursor: psycopg.Cursor[TupleRow],
    adds: list[AddMessage],
    locked: dict[int, _Locked],
    now: int,
) -> tuple[dict[AddMessage, int], list[tuple[AddMessage, AddMessage]]]:
    """The messages to insert, with their timestamps, and the resends queued in the same
    batch as their original (each with it); other resends get their stored message.

    Resends are looked up after the lock, so a concurrent process's committed resend is
    visible.
    """
    existing: dict[tuple[str, int, bytes], Message] = {}
    keyed = [op.new for op in adds if op.new.client_message_id is not None]
    if keyed:
        senders = [request.sender_id for request in keyed]
        chat_rows = [request.chat_row for request in keyed]
        keys = [encode(request.client_message_id or "") for request in keyed]
        for row in cursor.execute(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE (sender_id, chat_id,"
            " client_message_id) IN (SELECT * FROM unnest(%s::text[], %s::bigint[],"
            " %s::bytea[])) AND client_message_id IS NOT NULL",
            (senders, chat_rows, keys),
        ):
            existing[(row[2], row[1], bytes(row[6]))] = message_of(row, decode)
    inserts: dict[AddMessage, int] = {}
    originals: dict[tuple[str, int, bytes], AddMessage] = {}
    resends: list[tuple[AddMessage, AddMessage]] = []
    for add in adds:
        state = locked.get(add.new.chat_row)
        if state is None:
            add.error = StoreUnavailable(f"chat {add.new.chat.chat_id} does not exist")
            continue
        if state.members is not None and add.new.sender_id not in state.members:
            add.result = groups.not_a_member()
            continue
        key = None
        if add.new.client_message_id is not None:
            key = (add.new.sender_id, add.new.chat_row, encode(add.new.client_message_id))
            if key in existing:  # a resend is answered even across a later block
                add.result = (existing[key], False)
                continue
        if state.blocked:
            add.result = blocks.refused_in_chat()
            continue
        if key is not None:
            if key in originals:  # a resend queued in the same batch as its original
                resends.append((add, originals[key]))
                continue
            originals[key] = add
        created = max(now, state.last_ms)
        state.last_ms = created
        inserts[add] = created
    return inserts, resends


def _insert_messages(
    cursor: psycopg.Cursor[TupleRow],
    inserts: dict[AddMessage, int],
    locked: dict[int, _Locked],
    positions: dict[int, tuple[int, int]],
) -> None:
    if not inserts:
        return
    rows = [(add, created, *positions[id(add)]) for add, created in inserts.items()]
    cursor.executemany(
        "INSERT INTO messages (chat_id, sender_id, recipient_id, content, created_at_ms,"
        " client_message_id, seq, version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        [
            (
                add.new.chat_row,
                add.new.sender_id,
                add.new.recipient_id or "",
                encode(add.new.content),
                created,
                None if add.new.client_message_id is None else encode(add.new.client_message_id),
                seq,
                version,
            )
            for add, created, seq, version in rows
        ],
        returning=True,
    )
    message_rows = [_returned_id(cursor)]
    while cursor.nextset():  # one result set per inserted row (psycopg >= 3.1)
        message_rows.append(_returned_id(cursor))
    touched: dict[int, tuple[int, int, int, int]] = {}
    for (add, created, seq, version), message_row in zip(rows, message_rows, strict=True):
        message = Message(
            str(message_row),
            add.new.chat.chat_id,
            add.new.sender_id,
            add.new.recipient_id,
            add.new.content,
            format_ms(created),
            add.new.client_message_id,
            seq,
            version,
        )
        add.result = (message, True)
        # The chat as locked: a group's members of this moment.
        add.committed = Committed(locked[add.new.chat_row].chat, add.new.origin, message)
        touched[add.new.chat_row] = (created, message_row, seq, version)
        locked[add.new.chat_row].last_id = message_row
    # In the order of each chat's newest message, so the activity sequence follows it
    # (the rows are locked already; the order of these updates cannot deadlock).
    cursor.executemany(
        "UPDATE chats SET last_message_ms = %s, last_message_id = %s,"
        " last_activity_ms = GREATEST(last_activity_ms, %s), last_seq = %s, version = %s,"
        " activity_seq = nextval('chat_activity_seq') WHERE id = %s",
        [
            (created, message_row, created, seq, locked[chat_row].version, chat_row)
            for chat_row, (created, message_row, seq, _) in sorted(
                touched.items(), key=lambda item: item[1][1]
            )
        ],
    )
    # The senders' own marks, under the chat locks.
    cursor.executemany(
        _SQL.sql("mark_sender"),
        [
            {"chat": add.new.chat_row, "user": add.new.sender_id, "seq": seq, "at": created}
            for add, created, seq, _ in rows
        ],
    )


def _check_changes(
    cursor: psycopg.Cursor[TupleRow], changes: list[ChangeMessage], locked: dict[int, _Locked]
) -> dict[ChangeMessage, Message]:
    """The changes that may go ahead, with each message's state before it, checked in queue
    order as if applied one by one (a delete makes a later change of the same message in the
    batch see a tombstone). The others get their refusal as their result; deleting a tombstone
    again gets the tombstone, once the batch wrote it (`_repeated_deletes`)."""
    if not changes:
        return {}
    current: dict[tuple[int, int], Message] = {}
    for row in cursor.execute(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ANY(%s)",
        ([op.change.message_row for op in changes],),
    ):
        current[(row[1], row[0])] = message_of(row, decode)
    deleted_by: dict[tuple[int, int], ChangeMessage] = {}  # deletes allowed in this batch
    allowed: dict[ChangeMessage, Message] = {}
    for op in changes:
        change = op.change
        key = (change.chat_row, change.message_row)
        message = current.get(key)
        deleting = change.content is None
        refused = change_refused(
            None if message is None else message.sender_id,
            message is not None and message.deleted,
            change.user_id,
            deleting=deleting,
        )
        state = locked.get(change.chat_row)
        if state is not None and state.members is not None and change.user_id not in state.members:
            op.result = groups.not_a_member()
        elif refused is not None or state is None:
            op.result = refused or not_in_chat()
        elif state.blocked and not deleting:  # deleting one's own stays allowed
            op.result = blocks.refused_in_chat()
        elif deleting and message is not None and message.deleted:
            first = deleted_by.get(key)
            op.result = (message, False) if first is None else first
        elif message is not None:
            allowed[op] = message
            if deleting:
                deleted_by[key] = op
                current[key] = attrs.evolve(message, content="", deleted=True)
    return allowed


def _repeated_deletes(changes: list[ChangeMessage]) -> None:
    """A delete of a message that an earlier delete of the same batch made a tombstone: its
    answer is that tombstone, unchanged."""
    for op in changes:
        first = op.result
        if isinstance(first, ChangeMessage):
            op.result = (first.result[0], False)


def _apply_change(
    cursor: psycopg.Cursor[TupleRow], op: ChangeMessage, state: _Locked, version: int, now: int
) -> None:
    change = op.change
    if change.content is None:
        row = cursor.execute(
            f"UPDATE messages SET content = ''::bytea, deleted = 1, changed = 1, version = %s"
            f" WHERE id = %s RETURNING {MESSAGE_COLUMNS}",
            (version, change.message_row),
        ).fetchone()
    else:
        row = cursor.execute(
            f"UPDATE messages SET content = %s, edited_at_ms = %s, changed = 1, version = %s"
            f" WHERE id = %s RETURNING {MESSAGE_COLUMNS}",
            (encode(change.content), now, version, change.message_row),
        ).fetchone()
    assert row is not None  # the message exists: it was read under the chat lock
    updated = message_of(row, decode)
    op.result = (updated, True)
    # In a group, only the members who had the message learn of its change.
    audience = None if state.members is None else groups.seen_by(state.members, updated.seq)
    op.committed = Committed(state.chat, change.origin, updated, update=True, audience=audience)


def _move_read_mark(cursor: psycopg.Cursor[TupleRow], op: MoveReadMark, now: int) -> None:
    mark = op.mark
    row = cursor.execute(
        "SELECT seq FROM messages WHERE id = %s AND chat_id = %s", (mark.message_row, mark.chat_row)
    ).fetchone()
    if row is None:
        op.result = not_in_chat()
        return
    seq = row[0]
    before = 0
    if mark.chat.is_group:
        found = groups.read_seq_of(cursor, _SQL, mark.chat_row, mark.user_id)
        if found is None:
            op.result = groups.not_a_member()
            return
        before = found
    where = {"chat": mark.chat_row, "user": mark.user_id, "seq": seq, "at": now}
    # (Results, not `rowcount`: in pipeline mode that is only known once results are read.)
    delivered = cursor.execute(_SQL.sql("read_delivers"), where).fetchone()
    if cursor.execute(_SQL.sql("mark_read"), where).fetchone() is not None:
        receipt = ReceiptFrame(
            mark.chat.chat_id, mark.user_id, "read", seq, str(mark.message_row), format_ms(now)
        )
        audience = None
        if mark.chat.is_group:
            audience = groups.read_audience(cursor, _SQL, mark.chat_row, mark.user_id, before, seq)
        op.result = (receipt, True)
        op.committed = Committed(mark.chat, mark.origin, receipt=receipt, audience=audience)
        return
    current = cursor.execute(_SQL.sql("read_mark"), where).fetchone()
    op.result, op.committed = read_answer(mark, seq, current, now, delivered is not None)


def _record_delivered(
    cursor: psycopg.Cursor[TupleRow], op: MarkDelivered, locked: dict[int, _Locked], now: int
) -> None:
    """Move the user's marks in three statements; delivered marks that moved become receipts."""
    delivered = op.delivered
    user = delivered.user_id
    if delivered.chat_rows:
        cursor.execute(
            "UPDATE members SET chat_delivered = 1 WHERE user_id = %s AND chat_id = ANY(%s)"
            " AND chat_delivered = 0",
            (user, sorted(delivered.chat_rows)),
        )
    versions = [(row, version) for row, _, _, _, version in delivered.marks if version]
    if versions:
        cursor.execute(
            "UPDATE members m SET version_mark = v.version FROM unnest(%s::bigint[],"
            " %s::bigint[]) AS v(chat, version) WHERE m.chat_id = v.chat AND m.user_id = %s"
            " AND m.version_mark < v.version",
            ([row for row, _ in versions], [version for _, version in versions], user),
        )
    # A chat's ranges apply one after the other: one statement per layer (the first range of
    # every chat, then the second, ...).
    layers: list[list[tuple[int, int, int, str | None, int]]] = []
    seen: dict[int, int] = {}
    for mark in delivered.marks:
        if not mark[2]:
            continue
        depth = seen.get(mark[0], 0)
        seen[mark[0]] = depth + 1
        if depth == len(layers):
            layers.append([])
        layers[depth].append(mark)
    if not layers:
        return
    message_ids: dict[int, str | None] = {}
    moved_to: dict[int, int] = {}
    firsts: dict[int, int] = {}
    for layer in layers:
        asked = {mark[0]: mark for mark in layer}
        for chat_row, seq, before in cursor.execute(
            # (`o`, the same row joined again, is the mark before this update.)
            "UPDATE members m SET delivered_at_ms = %s, delivered_seq = COALESCE((SELECT x.seq"
            " FROM messages x WHERE x.chat_id = v.chat AND x.seq > v.seq"
            " AND x.sender_id <> m.user_id ORDER BY x.seq LIMIT 1) - 1,"
            " (SELECT c.last_seq FROM chats c WHERE c.id = v.chat)) FROM"
            " unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS v(chat, seq, first),"
            " members o WHERE m.chat_id = v.chat AND m.user_id = %s AND m.delivered_seq < v.seq"
            " AND o.chat_id = m.chat_id AND o.user_id = m.user_id"
            " AND NOT EXISTS (SELECT 1 FROM messages x WHERE x.chat_id = v.chat"
            " AND x.seq > m.delivered_seq AND x.seq < v.first AND x.sender_id <> m.user_id)"
            " RETURNING m.chat_id, m.delivered_seq, o.delivered_seq",
            (
                now,
                [mark[0] for mark in layer],
                [mark[2] for mark in layer],
                [mark[1] for mark in layer],
                user,
            ),
        ).fetchall():
            moved_to[chat_row] = seq
            mark = asked[chat_row]
            message_ids[chat_row] = mark[3] if seq == mark[2] else None
            firsts.setdefault(chat_row, before + 1)  # the first layer's mark was the lowest
    # A mark that went on over the user's own messages: the id of the message it ends at.
    beyond = [(row, seq) for row, seq in moved_to.items() if message_ids[row] is None]
    if beyond:
        for chat_row, message_row in cursor.execute(
            "SELECT x.chat_id, x.id FROM messages x JOIN unnest(%s::bigint[],"
            " %s::bigint[]) AS v(chat, seq) ON x.chat_id = v.chat AND x.seq = v.seq",
            ([row for row, _ in beyond], [seq for _, seq in beyond]),
        ):
            message_ids[chat_row] = str(message_row)
    moved = list(moved_to.items())
    receipts = []
    for chat_row, seq in sorted(moved):
        state = locked.get(chat_row)
        if state is None:
            continue
        receipt = ReceiptFrame(
            state.chat.chat_id, user, "delivered", seq, message_ids.get(chat_row), format_ms(now)
        )
        audience = None
        if state.chat.is_group:  # (its members need not be loaded: `audience` decides)
            audience = groups.receipt_audience(
                cursor, _SQL, chat_row, user, firsts.get(chat_row, seq), seq
            )
        receipts.append(Committed(state.chat, receipt=receipt, audience=audience))
    if receipts:
        op.committed = tuple(receipts)


# --------------------------------------------------------------------------- the policy


class BatchCommitter:
    """The writer's connection and its failure policy (see the module docstring): the
    `apply` of the PostgreSQL `GroupCommitWriter`, run in its worker thread."""

    def __init__(self, connector: Connector, outbox: Outbox | None = None) -> None:
        self._connector = connector
        self._connection: Connection | None = None
        self._outbox = outbox

    def __call__(self, batch: list[Op]) -> str | None:
        """Commit `batch`, retrying what is safe to retry; every op ends with a result or an
        error. Returns why the database could not write, or None."""
        attempt = 0
        while True:
            attempt += 1
            commit_sent = False
            try:
                connection = self._connect()
                with connection.pipeline() if _PIPELINE else contextlib.nullcontext():
                    # Pipeline mode: statements whose results are not needed yet (BEGIN, the
                    # UPDATEs, COMMIT) travel together instead of one round trip each.
                    connection.execute("BEGIN")
                    apply_batch(connection, batch)
                    if self._outbox is not None:  # the events of the batch, before COMMIT
                        self._outbox.write(connection.cursor(), _SQL, batch, now_ms())
                    commit_sent = True
                    connection.execute("COMMIT")
                return None
            except StoreUnavailable as error:
                return _fail(batch, error)
            except _TRANSIENT:
                self._rollback()
                if attempt < _BATCH_RETRIES:
                    continue
                return _fail(batch, StoreUnavailable("postgres: too much lock contention"))
            except psycopg.Error as error:
                if not usable(self._connection):
                    self.close_connection()
                    if commit_sent:
                        return _fail(
                            batch,
                            StoreUnavailable(
                                f"postgres connection lost during COMMIT, outcome unknown:"
                                f" {describe(error)}"
                            ),
                        )
                    # Nothing reached COMMIT, so nothing is half-done: a stale connection
                    # (e.g. after a server restart) gets one fresh try.
                    if attempt == 1:
                        continue
                    return _fail(batch, StoreUnavailable(f"postgres write: {describe(error)}"))
                self._rollback()
                if len(batch) > 1 and isinstance(error, _OP_SPECIFIC):
                    return self._replay_each(batch)
                failure = StoreUnavailable(f"postgres write: {describe(error)}")
                if isinstance(error, _OP_SPECIFIC):
                    _fail(batch, failure)
                    return None  # this operation's data, not the database
                return _fail(batch, failure)  # e.g. disk full
            except Exception as error:
                # A bug must fail its batch, not kill the writer and every later write with it.
                self._rollback()
                _fail(batch, StoreUnavailable(f"postgres write failed: {error!r}"))
                return None

    def _replay_each(self, batch: list[Op]) -> str | None:
        """One transaction per operation, so only the faulty one fails."""
        failures = [self([op]) for op in batch]
        return next((failure for failure in reversed(failures) if failure is not None), None)

    def _connect(self) -> Connection:
        if not usable(self._connection):
            self.close_connection()
            self._connection = self._connector.connect()
        assert self._connection is not None
        return self._connection

    def _rollback(self) -> None:
        try:
            if self._connection is not None:
                self._connection.execute("ROLLBACK")
        except psycopg.Error:
            self.close_connection()

    def close_connection(self) -> None:
        """Drop the writer's connection (the store is closing, or it broke)."""
        close_quietly(self._connection)
        self._connection = None


def _fail(batch: Sequence[Op], error: StoreUnavailable) -> str:
    """Fail every op of the batch with `error`; returns it as the reason writes failed."""
    for op in batch:
        op.fail(error)
    return str(error)


__all__ = [
    "AddMessage",
    "BatchCommitter",
    "ChangeMembers",
    "CreateChat",
    "CreateGroup",
    "MarkDelivered",
    "Probe",
    "apply_batch",
    "decode",
    "encode",
]
