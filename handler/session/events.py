"""The session machine's vocabulary: the events it is fed and the commands it returns.

Pure records, never changed once made. (`attrs.define`, not `frozen`: several are made for
every message on the hot path, and a frozen instance costs twice as much to build.) An event
is something that happened (a decoded frame, the result of a command,
a fan-out item, a deadline); a command is something for the driver to do. A command that
produces a result names it in its docstring; the driver feeds that result back as an event,
before anything else is fed. Results echo the frame they answer, so the machine needs no
table of requests in flight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from handler import protocol
from handler.errors import CloseCode, ProtocolError
from handler.session.outgoing import Outgoing, Receipt

if TYPE_CHECKING:
    from handler.auth import Identity
    from handler.ratelimit import TokenBucket
    from handler.store.base import BacklogPlan

Page = tuple[tuple[protocol.Message, ...], bool]


@attrs.define
class Instant:
    """The time an event happened: the monotonic clock for deadlines, the wall clock for
    token expiry (`exp` is wall-clock time)."""

    monotonic: float
    wall: float


# --------------------------------------------------------------------------- events


@attrs.define
class Opened:
    """The upgrade completed; `token` is its `?token=` query parameter, if any."""

    token: str | None


@attrs.define
class FrameReceived:
    """A data frame arrived and was decoded: `frame`, or the `error` decoding raised."""

    frame: protocol.ClientFrame | None
    error: ProtocolError | None = None


@attrs.define
class DeadlineReached:
    """`next_deadline()` passed (idle, authentication or token expiry)."""


@attrs.define
class FanOut:
    """A committed chat or message for this connection's user, from the hub."""

    item: Outgoing


@attrs.define
class Subscribed:
    """`Subscribe` succeeded: the user's fan-out reaches this connection (parked), and `plan`
    is the backlog snapshot read after that. `bucket` is the user's shared rate limiter."""

    plan: BacklogPlan
    bucket: TokenBucket


@attrs.define
class SubscribeFailed:
    error: Exception


@attrs.define
class BacklogRead:
    chat_id: str
    messages: tuple[protocol.Message, ...]


@attrs.define
class UpdatesRead:
    """One chat's messages that changed while the device was away (`ReadUpdates`)."""

    chat_id: str
    messages: tuple[protocol.Message, ...]


@attrs.define
class BacklogFailed:
    error: Exception


@attrs.define
class Replayed:
    """Every `Write` before the `Replay` that asked for this was carried out."""


@attrs.define
class ChatLoaded:
    frame: protocol.ChatFrame
    chat: protocol.Chat | None


@attrs.define
class ChatStored:
    frame: protocol.CreateChat | protocol.CreateGroup
    chat: protocol.ChatView
    created: bool


@attrs.define
class MembersStored:
    """An `add_members` or `remove_member` was applied: `chat` is the chat object for the
    requester now; `changed` tells whether anyone joined or left (then its fan-out carries
    the answer)."""

    frame: protocol.AddMembers | protocol.RemoveMember
    chat: protocol.ChatView
    changed: bool


@attrs.define
class MessageStored:
    frame: protocol.SendMessage
    message: protocol.Message
    created: bool


@attrs.define
class ReadStored:
    """`mark_read` was applied: `receipt` is the user's read mark now; `moved` tells whether
    it moved (then its fan-out carries the answer)."""

    frame: protocol.MarkRead
    receipt: protocol.ReceiptFrame
    moved: bool


@attrs.define
class ChangeStored:
    """An edit or delete was applied (`changed`: its fan-out carries the answer) or changed
    nothing (deleting a tombstone again)."""

    frame: protocol.EditMessage | protocol.DeleteMessage
    message: protocol.Message
    changed: bool


@attrs.define
class ChatsListed:
    frame: protocol.FetchChats
    chats: tuple[protocol.ChatView, ...]


@attrs.define
class PageRead:
    """`page` is None when `before` is not a message of the chat."""

    frame: protocol.FetchMessages
    page: Page | None


@attrs.define
class HistoryRead:
    """One chat's page of a `fetch_chats` answer, read by the history stream."""

    frame: protocol.FetchChats
    chat_id: str
    messages: tuple[protocol.Message, ...]
    has_more: bool


@attrs.define
class HistoryDone:
    """The history stream ended (`error` set when a read failed)."""

    frame: protocol.FetchChats
    error: Exception | None = None


@attrs.define
class PresenceRead:
    """The answer to a `fetch_presence`."""

    frame: protocol.FetchPresence
    entries: tuple[protocol.PresenceEntry, ...]


@attrs.define
class BlockStored:
    """The user's block list after a `block_user`/`unblock_user` (`changed`: its fan-out
    carries the answer), or as read for `fetch_blocked`."""

    frame: protocol.BlockUser | protocol.UnblockUser | protocol.FetchBlocked
    blocks: tuple[str, ...]
    changed: bool = False


@attrs.define
class RequestFailed:
    """A command for `frame` raised `error` (a store or bus fault, or a protocol error)."""

    frame: protocol.ClientFrame
    error: Exception


Event = (
    Opened
    | FrameReceived
    | DeadlineReached
    | FanOut
    | Subscribed
    | SubscribeFailed
    | BacklogRead
    | UpdatesRead
    | BacklogFailed
    | Replayed
    | ChatLoaded
    | ChatStored
    | MembersStored
    | MessageStored
    | ReadStored
    | ChangeStored
    | ChatsListed
    | PageRead
    | HistoryRead
    | HistoryDone
    | PresenceRead
    | BlockStored
    | RequestFailed
)


# --------------------------------------------------------------------------- commands


@attrs.define
class Reply:
    """Send `frame` on this connection, waiting for room in its outbox."""

    frame: protocol.ServerFrame
    frame_type: str
    receipt: Receipt | None = None


@attrs.define
class Write:
    """Send an already encoded fan-out item, waiting for room (a parked item's replay)."""

    item: Outgoing


@attrs.define
class Push:
    """Send a live fan-out item without waiting; a full outbox drops the connection."""

    item: Outgoing


@attrs.define
class DropSlow:
    """Slow-consumer policy: close 1013; what the connection missed stays undelivered."""


@attrs.define
class Subscribe:
    """Make the connection reachable by the user's fan-out (parked until `Replay` reports
    `Replayed` with nothing left), commit the user's delivery marks everywhere, then read the
    backlog plan. Result: `Subscribed` or `SubscribeFailed`."""

    identity: Identity


@attrs.define
class Unsubscribe:
    """Stop the user's fan-out to this connection; it is unbound again."""


@attrs.define
class ReadBacklog:
    """Read one chat's undelivered messages. Result: `BacklogRead` or `BacklogFailed`."""

    user_id: str
    chat_id: str
    after_seq: int
    up_to_seq: int


@attrs.define
class ReadUpdates:
    """Read one chat's messages changed while away. Result: `UpdatesRead` or
    `BacklogFailed`."""

    user_id: str
    chat_id: str
    after_version: int
    up_to_version: int
    up_to_seq: int


@attrs.define
class Replay:
    """Result: `Replayed`, once the commands before it are carried out."""


@attrs.define
class LoadChat:
    """Result: `ChatLoaded` (or `RequestFailed`)."""

    frame: protocol.ChatFrame


@attrs.define
class StoreChat:
    """Create or find the pair's chat. Result: `ChatStored` (or `RequestFailed`)."""

    frame: protocol.CreateChat
    user_id: str


@attrs.define
class StoreGroup:
    """Create a group. Result: `ChatStored` (or `RequestFailed`)."""

    frame: protocol.CreateGroup
    user_id: str


@attrs.define
class StoreMembers:
    """Add or remove members (the fan-out carries the answer when anything changed).
    Result: `MembersStored` (or `RequestFailed`)."""

    frame: protocol.AddMembers | protocol.RemoveMember
    chat: protocol.Chat
    user_id: str


@attrs.define
class StoreMessage:
    """Store the message (its fan-out, acknowledgement included, comes from the hub).
    Result: `MessageStored` (or `RequestFailed`)."""

    frame: protocol.SendMessage
    chat: protocol.Chat
    user_id: str


@attrs.define
class StoreRead:
    """Move the read mark. Result: `ReadStored` (or `RequestFailed`)."""

    frame: protocol.MarkRead
    chat: protocol.Chat
    user_id: str


@attrs.define
class StoreChange:
    """Edit or delete the message (its fan-out, acknowledgement included, comes from the
    hub). Result: `ChangeStored` (or `RequestFailed`)."""

    frame: protocol.EditMessage | protocol.DeleteMessage
    chat: protocol.Chat
    user_id: str


@attrs.define
class ListChats:
    """Result: `ChatsListed` (or `RequestFailed`)."""

    frame: protocol.FetchChats
    user_id: str


@attrs.define
class ReadPage:
    """Result: `PageRead` (or `RequestFailed`)."""

    frame: protocol.FetchMessages


@attrs.define
class StreamHistories:
    """In the background, read each chat's newest page in order and feed `HistoryRead` for
    each (carrying out its `Reply` before reading the next), then `HistoryDone`."""

    frame: protocol.FetchChats
    chat_ids: tuple[str, ...]


@attrs.define
class ReportInternal:
    """An unexpected fault: log it with a correlation id and answer `internal_error(...)`."""

    error: BaseException
    request_id: protocol.RequestId | None = None


@attrs.define
class Close:
    code: CloseCode
    reason: str


@attrs.define
class SendTyping:
    """Tell the chat's other participants, unless `forward` is False (a renewal sent too
    soon: only checked). No result; `RequestFailed` across a block."""

    frame: protocol.Typing
    chat: protocol.Chat
    user_id: str
    forward: bool = True


@attrs.define
class ReadPresence:
    """Result: `PresenceRead` (or `RequestFailed`)."""

    frame: protocol.FetchPresence
    user_id: str


@attrs.define
class StoreBlock:
    """Block, unblock, or (`fetch_blocked`) just read the list. Result: `BlockStored` (or
    `RequestFailed`)."""

    frame: protocol.BlockUser | protocol.UnblockUser | protocol.FetchBlocked
    user_id: str


@attrs.define
class CloseWhenWritten:
    """Close once everything queued before is written (the error that explains it first)."""

    code: CloseCode
    reason: str


Command = (
    Reply
    | Write
    | Push
    | DropSlow
    | Subscribe
    | Unsubscribe
    | ReadBacklog
    | ReadUpdates
    | Replay
    | LoadChat
    | StoreChat
    | StoreGroup
    | StoreMembers
    | StoreMessage
    | StoreRead
    | StoreChange
    | ListChats
    | ReadPage
    | StreamHistories
    | ReportInternal
    | Close
    | CloseWhenWritten
    | SendTyping
    | ReadPresence
    | StoreBlock
)
