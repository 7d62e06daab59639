"""One connection's protocol rules as a sans-IO state machine: `handle(event, now) -> commands`.

No `await`, no clock reads, no store, hub or socket: the driver (`handler.transport.driver`)
decodes frames, feeds events with the time they happened, and carries out the commands.

Theory of operation
===================

States::

    UNBOUND --(valid token, in the query or a frame)--> BINDING --(backlog and replay
        ^                                                  |        written)--> BOUND
        +---------------(subscription or backlog failed)---+

- UNBOUND: only `ping` is served; any other frame without a token gets `unauthorized`. The
  authentication deadline closes the connection with 1008.
- BINDING: the user's fan-out reaches this connection, but is *parked*; the backlog goes out
  (`authenticated`, `new_chats`, `new_messages`), then the parked items it does not contain,
  then the frame that carried the token is answered.
- BOUND: every frame type is served. A token for the same user with a later `exp` extends
  the connection's life; a token for another user is `forbidden`.

The binding rule -- every chat and message reaches a (re)connecting user exactly once, in the
backlog or live, never both, never neither -- rests on one order of steps:

1. `Subscribe` first: from then on every commit for the user reaches this machine as `FanOut`
   (the bus's `subscribe` returns only once that holds), and is parked.
2. Then the backlog *snapshot* (`Subscribed.plan`): what is undelivered, and for every chat of
   the user its newest message id, the *high-water mark*. The driver commits this node's and
   the other nodes' pending delivery marks for the user before taking it, so what another
   connection of the user has just received is not offered again.
3. Each chat's undelivered messages are read up to its mark only, so a message committed after
   the snapshot cannot be in both the backlog and the fan-out.
4. Fan-out of an item at or below its chat's mark (a chat of the snapshot, or a message or
   change whose version is at most the chat's version in the snapshot) is in the backlog or
   was delivered before the binding: it is dropped, parked or live, for `backlog_memory_s`
   (long past any commit-to-publish delay, even across nodes). Everything above the mark is
   sent, except a change the backlog already carried (a message it read in a newer state than
   the snapshot), of which only the receipt goes.
5. Parked items are replayed (`Write`, waiting for room) before going live; items that arrive
   while the replay is written are parked too and replayed next (`Replay` -> `Replayed`), so
   live `Push`es never overtake them.

Versions grow in commit order within a chat, which is what makes a per-chat mark enough.
An item counts as delivered only once the client's TCP stack acknowledged the frame carrying
its `Receipt` (the transport's job); an item that never got there is offered again next time.

Every frame first passes the rate limiter (the user's, shared by the user's connections, once
subscribed; the connection's own before), so a flood of garbage costs what a flood of valid
frames costs. Recoverable errors answer an `error` frame and change nothing.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs

from handler import protocol
from handler.errors import CloseCode, ConnectionLimitReached, ErrorCode, ProtocolError
from handler.ratelimit import TokenBucket
from handler.session import checks
from handler.session import events as ev
from handler.session.outgoing import MARK_ONLY, TYPING, Outgoing, Receipt, SeqMark

if TYPE_CHECKING:
    from handler.auth import Identity

# How long a binding remembers its snapshot's marks to drop late fan-out of the same items.
BACKLOG_MEMORY_S: Final = 60.0
# What a second `fetch_chats` during the first is told to wait; the first one's pace is the
# client's own reading speed, so this is a hint, not a promise.
FETCH_RETRY_MS: Final = 1000
# A typing renewal is forwarded at most this often per connection and chat.
TYPING_REPEAT_S: Final = 1.0
# How long a receiver shows a typing indicator without a renewal.
TYPING_SHOWN_S: Final = protocol.TYPING_EXPIRES_MS / 1000

Verifier = Callable[[str, float], "Identity"]
"""Checks a token at a wall-clock time; raises `ProtocolError(unauthorized)`."""


class State(enum.Enum):
    UNBOUND = "unbound"
    BINDING = "binding"
    BOUND = "bound"


@attrs.frozen
class SessionRules:
    """The limits one session enforces (from `LimitsConfig`)."""

    auth_timeout_s: float
    idle_timeout_s: float
    rate_per_s: float
    rate_burst: float
    park_capacity: int  # fan-out items a binding may park: the outbox's frame capacity
    backlog_memory_s: float = BACKLOG_MEMORY_S


def internal_error(
    correlation_id: str, request_id: protocol.RequestId | None = None
) -> protocol.ErrorFrame:
    """The `internal` answer; the message quotes the id the log line carries."""
    return protocol.ErrorFrame(
        ErrorCode.INTERNAL,
        f"internal server error (correlation id {correlation_id}); try again",
        request_id=request_id,
    )


_DROP_SLOW: Final = ev.DropSlow()


def _error_reply(error: ProtocolError) -> ev.Reply:
    return ev.Reply(protocol.ErrorFrame.from_error(error), "error")


def _received(user_id: str, chat_id: str, messages: tuple[protocol.Message, ...]) -> Receipt | None:
    """The receipt for a page of history (oldest first): it moves the user's delivered mark
    where the page continues it (see `SeqMark`), never the changes' mark."""
    if not messages:
        return None
    last = messages[-1]
    return Receipt(
        user_id, marks=(SeqMark(chat_id, last.seq, last.message_id, first=messages[0].seq),)
    )


class SessionMachine:
    """See the module docstring. One per connection; `handle` is its only entry point."""

    def __init__(self, rules: SessionRules, verify: Verifier, now: ev.Instant) -> None:
        self._rules = rules
        self._verify = verify
        self.state = State.UNBOUND
        self.user_id: str | None = None
        self._auth_deadline = now.monotonic + rules.auth_timeout_s
        self._idle_deadline = now.monotonic + rules.idle_timeout_s
        self._expiry_deadline = math.inf
        self._token: str | None = None  # the last verified token, to skip re-verifying it
        # The connection's own limiter, made on its first frame before binding (a connection
        # that binds with `?token=` never needs one); once bound, the user's shared one.
        self._own_bucket: TokenBucket | None = None
        self._user_bucket: TokenBucket | None = None
        self._fetching = False  # a fetch_chats answer is being streamed
        # BINDING only: parked fan-out, the frame to answer once bound, backlog still to read.
        # Lists, not deques (an empty deque is ten times an empty list, and every connection
        # keeps these): the backlog's work lists are reversed and taken from the end.
        self._parked: list[Outgoing] = []
        self._after_bind: protocol.ClientFrame | None = None
        self._backlog_todo: list[tuple[str, int]] = []
        self._updates_todo: list[tuple[str, int, int]] = []
        self._updates_pending: set[str] = set()
        self._snapshot_marks: dict[str, tuple[int, int]] = {}
        # What the snapshot covered (chat id -> its version), until `_marks_until`; and the
        # messages the backlog carried in a newer state than that (message id -> version).
        self._marks: dict[str, int] = {}
        self._sent_versions: dict[str, int] = {}
        self._marks_until = -math.inf
        self._backlog_chats: frozenset[str] = frozenset()  # the snapshot's new chats
        self.backlog_chats = 0
        self.backlog_messages = 0
        # Chats this connection said it types in: when it last forwarded `active: true`
        # there (monotonic), and the chat (to say `active: false` for it when it closes).
        self._typing: dict[str, tuple[float, protocol.Chat]] = {}

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float:
        """When to feed `DeadlineReached` if nothing else happens first."""
        if self.state is State.UNBOUND:
            return min(self._idle_deadline, self._auth_deadline)
        return min(self._idle_deadline, self._expiry_deadline)

    def _deadline_close(self, now: float) -> list[ev.Command]:
        if now >= self._idle_deadline:
            return [
                ev.Close(CloseCode.POLICY_VIOLATION, "idle timeout: send ping to stay connected")
            ]
        if self.state is State.UNBOUND:
            if now >= self._auth_deadline:
                return [ev.Close(CloseCode.POLICY_VIOLATION, "not authenticated in time")]
        elif now >= self._expiry_deadline:
            return [ev.Close(CloseCode.POLICY_VIOLATION, "token expired")]
        return []

    # ------------------------------------------------------------------ entry point

    def handle(self, event: ev.Event, now: ev.Instant) -> list[ev.Command]:
        """Apply one event; return what the driver must do, in order."""
        match event:  # the per-message events first: each case is an isinstance check
            case ev.FrameReceived():
                return self._frame_received(event, now)
            case ev.ChatLoaded():
                return self._chat_loaded(event, now.monotonic)
            case ev.MessageStored():
                if event.created:
                    return []  # its fan-out carries the acknowledgement, in commit order
                # An idempotent resend: the sender gets the stored message again, nobody else.
                return [
                    ev.Reply(
                        protocol.MessageEvent(event.message, event.frame.request_id), "message"
                    )
                ]
            case ev.FanOut():
                outcome = self.fan_out(event.item, now.monotonic)
                if outcome is None:
                    return []
                return [ev.Push(outcome) if isinstance(outcome, Outgoing) else outcome]
            case ev.DeadlineReached():
                return self._deadline_close(now.monotonic)
            case ev.Opened():
                return self._opened(event.token, now)
            case ev.Subscribed():
                return self._subscribed(event, now)
            case ev.SubscribeFailed():
                return self._subscribe_failed(event.error)
            case ev.BacklogRead():
                return self._backlog_read(event, now)
            case ev.UpdatesRead():
                return self._updates_read(event, now)
            case ev.BacklogFailed():
                self._unbind()
                return [
                    ev.Unsubscribe(),
                    ev.ReportInternal(event.error),
                    ev.Close(CloseCode.INTERNAL_ERROR, "backlog unavailable; reconnect"),
                ]
            case ev.Replayed():
                return self._replayed(now)
            case ev.ChatStored():
                chat = event.chat
                return [
                    ev.Reply(
                        protocol.NewChats((chat,), event.frame.request_id),
                        "new_chats",
                        Receipt(self._user(), chat_ids=(chat.chat_id,)),
                    )
                ]
            case ev.MembersStored():
                if event.changed:
                    return []  # its fan-out carries the answer, with the request_id
                updated = protocol.ChatUpdated(event.chat, event.frame.request_id)
                return [ev.Reply(updated, "chat_updated")]
            case ev.ReadStored():
                if event.moved:
                    return []  # its fan-out carries the answer, with the request_id
                receipt = attrs.evolve(event.receipt, request_id=event.frame.request_id)
                return [ev.Reply(receipt, "receipt")]
            case ev.ChangeStored():
                if event.changed:
                    return []  # its fan-out carries the acknowledgement, in commit order
                update = protocol.MessageUpdated(event.message, event.frame.request_id)
                return [ev.Reply(update, "message_updated")]
            case ev.ChatsListed():
                return self._chats_listed(event)
            case ev.PageRead():
                return self._page_read(event)
            case ev.HistoryRead():
                frame = event.frame
                return [
                    ev.Reply(
                        protocol.AllMessages(
                            event.chat_id, event.messages, event.has_more, frame.request_id
                        ),
                        "all_messages",
                        _received(self._user(), event.chat_id, event.messages),
                    )
                ]
            case ev.HistoryDone():
                self._fetching = False
                if event.error is None:
                    return []
                return self._failure(event.error, event.frame.request_id)
            case ev.PresenceRead():
                presence = protocol.PresenceFrame(event.entries, event.frame.request_id)
                return [ev.Reply(presence, "presence")]
            case ev.BlockStored():
                if event.changed:
                    return []  # its fan-out carries the answer, with the request_id
                blocked = protocol.BlockedFrame(event.blocks, event.frame.request_id)
                return [ev.Reply(blocked, "blocked")]
            case ev.RequestFailed():
                if isinstance(event.frame, protocol.Typing):
                    self._typing.pop(event.frame.chat_id, None)  # it did not go out
                return self._failure(event.error, event.frame.request_id)
        raise AssertionError(f"unknown event {event!r}")

    # ------------------------------------------------------------------ frames

    def _frame_received(self, event: ev.FrameReceived, now: ev.Instant) -> list[ev.Command]:
        self._idle_deadline = now.monotonic + self._rules.idle_timeout_s
        frame = event.frame
        bucket = self._user_bucket or self._own_bucket
        if bucket is None:
            bucket = self._own_bucket = TokenBucket(self._rules.rate_per_s, self._rules.rate_burst)
        wait_s = bucket.take(now.monotonic)
        if wait_s > 0:
            return [
                _error_reply(
                    ProtocolError(
                        ErrorCode.RATE_LIMITED,
                        f"too many frames; limit is {self._rules.rate_per_s:g} per second",
                        request_id=frame.request_id if frame is not None else None,
                        retry_after_ms=max(1, math.ceil(wait_s * 1000)),
                    )
                )
            ]
        if event.error is not None:
            return [_error_reply(event.error)]
        assert frame is not None
        # The driver feeds the next frame only once this one's commands are carried out.
        assert self.state is not State.BINDING, "a frame arrived while binding"
        try:
            identity = self._authenticate(frame, now)
        except ProtocolError as error:
            return [_error_reply(error.with_request_id(frame.request_id))]
        if identity is not None:
            return self._start_binding(identity, now, frame)
        try:
            return self._serve(frame)
        except ProtocolError as error:
            return [_error_reply(error.with_request_id(frame.request_id))]

    def _authenticate(self, frame: protocol.ClientFrame, now: ev.Instant) -> Identity | None:
        """None when the frame may be served now; the identity to bind with otherwise."""
        token = frame.token
        if token is None:
            if self.state is State.UNBOUND and frame.type != "ping":
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    "not authenticated: send a token in this frame or in ?token=",
                    field="token",
                )
            return None
        if token == self._token:
            if self._expiry_deadline <= now.monotonic:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "invalid token: expired")
            return None
        identity = self._verify(token, now.wall)
        if self.state is State.UNBOUND:
            self._token = token
            return identity
        if identity.user_id != self.user_id:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "this connection is bound to another user; open a new connection",
                field="token",
            )
        # In-band refresh: the connection lives until the latest expiry it was shown.
        self._token = token
        self._expiry_deadline = max(self._expiry_deadline, _deadline_of(identity, now))
        return None

    def _opened(self, token: str | None, now: ev.Instant) -> list[ev.Command]:
        if token is None:
            return []
        try:
            identity = self._verify(token, now.wall)
        except ProtocolError as error:
            return [_error_reply(error)]
        self._token = token
        return self._start_binding(identity, now, None)

    def _serve(self, frame: protocol.ClientFrame) -> list[ev.Command]:
        match frame:
            case protocol.Ping():
                return [ev.Reply(protocol.Pong(frame.request_id), "pong")]
            case protocol.CreateChat():
                checks.check_create_chat(frame, self._user())
                return [ev.StoreChat(frame, self._user())]
            case protocol.CreateGroup():
                checks.check_create_group(frame, self._user())
                return [ev.StoreGroup(frame, self._user())]
            case (
                protocol.SendMessage()
                | protocol.FetchMessages()
                | protocol.MarkRead()
                | protocol.EditMessage()
                | protocol.DeleteMessage()
                | protocol.AddMembers()
                | protocol.RemoveMember()
                | protocol.Typing()
            ):
                return [ev.LoadChat(frame)]
            case protocol.FetchPresence():
                return [ev.ReadPresence(frame, self._user())]
            case protocol.BlockUser() | protocol.UnblockUser():
                if frame.user_id == self._user():
                    raise ProtocolError(
                        ErrorCode.BAD_REQUEST, "you cannot block yourself", field="user_id"
                    )
                return [ev.StoreBlock(frame, self._user())]
            case protocol.FetchBlocked():
                return [ev.StoreBlock(frame, self._user())]
            case protocol.FetchChats():
                if self._fetching:
                    raise ProtocolError(
                        ErrorCode.RATE_LIMITED,
                        "a fetch_chats is still being answered on this connection; wait for"
                        " its all_messages frames",
                        retry_after_ms=FETCH_RETRY_MS,
                    )
                return [ev.ListChats(frame, self._user())]
        raise AssertionError(f"unknown frame {frame!r}")

    def _chat_loaded(self, event: ev.ChatLoaded, now: float) -> list[ev.Command]:
        frame, user_id = event.frame, self._user()
        try:
            chat = checks.check_participant(event.chat, user_id)
            match frame:
                case protocol.FetchMessages():
                    return [ev.ReadPage(frame)]
                case protocol.MarkRead():
                    return [ev.StoreRead(frame, chat, user_id)]
                case protocol.EditMessage() | protocol.DeleteMessage():
                    return [ev.StoreChange(frame, chat, user_id)]
                case protocol.Typing():
                    return self._typing_to(frame, chat, user_id, now)
                case protocol.AddMembers() | protocol.RemoveMember():
                    if not chat.is_group:
                        raise ProtocolError(
                            ErrorCode.BAD_REQUEST,
                            "a direct chat cannot gain or lose members; create a group",
                            field="chat_id",
                        )
                    return [ev.StoreMembers(frame, chat, user_id)]
            checks.check_recipient(frame, chat, user_id)
        except ProtocolError as error:
            return [_error_reply(error.with_request_id(frame.request_id))]
        # The receivers stop showing the sender typing when the message arrives: the next
        # `typing` in this chat is news again.
        self._typing.pop(frame.chat_id, None)
        return [ev.StoreMessage(frame, chat, user_id)]

    # ------------------------------------------------------------------ typing

    def _typing_to(
        self, frame: protocol.Typing, chat: protocol.Chat, user_id: str, now: float
    ) -> list[ev.Command]:
        """Checked like every frame (the driver's `SendTyping` refuses it across a block);
        a renewal within `TYPING_REPEAT_S` of the last one forwarded for the chat is not
        forwarded again: the receivers still show it (a client may send one per key)."""
        if not frame.active:
            self._typing.pop(frame.chat_id, None)
            return [ev.SendTyping(frame, chat, user_id)]
        last = self._typing.get(frame.chat_id)
        if last is not None and now - last[0] < TYPING_REPEAT_S:
            return [ev.SendTyping(frame, chat, user_id, forward=False)]
        expired = now - TYPING_SHOWN_S
        for chat_id in [c for c, (at, _) in self._typing.items() if at < expired]:
            del self._typing[chat_id]
        self._typing[frame.chat_id] = (now, chat)
        return [ev.SendTyping(frame, chat, user_id)]

    def typing_left_on(self, now: float) -> list[protocol.Chat]:
        """The chats whose receivers may still show this connection's user typing (it is
        closing: the driver says `active: false` there)."""
        shown = [chat for at, chat in self._typing.values() if now - at < TYPING_SHOWN_S]
        self._typing.clear()
        return shown

    def _chats_listed(self, event: ev.ChatsListed) -> list[ev.Command]:
        frame, chats = event.frame, event.chats
        chat_ids = tuple(chat.chat_id for chat in chats)
        commands: list[ev.Command] = [
            ev.Reply(
                protocol.AllChats(chats, frame.request_id),
                "all_chats",
                Receipt(self._user(), chat_ids=chat_ids),
            )
        ]
        if chats and frame.limit > 0:  # `limit: 0` asks for the chat list alone
            self._fetching = True
            commands.append(ev.StreamHistories(frame, chat_ids))
        return commands

    def _page_read(self, event: ev.PageRead) -> list[ev.Command]:
        frame = event.frame
        if event.page is None:
            return [_error_reply(checks.unknown_before().with_request_id(frame.request_id))]
        messages, has_more = event.page
        return [
            ev.Reply(
                protocol.AllMessages(frame.chat_id, messages, has_more, frame.request_id),
                "all_messages",
                _received(self._user(), frame.chat_id, messages),
            )
        ]

    def _failure(self, error: Exception, request_id: protocol.RequestId | None) -> list[ev.Command]:
        if isinstance(error, ProtocolError):
            commands: list[ev.Command] = [_error_reply(error.with_request_id(request_id))]
            if isinstance(error, ConnectionLimitReached):
                commands.append(ev.CloseWhenWritten(CloseCode.POLICY_VIOLATION, error.close_reason))
            return commands
        return [ev.ReportInternal(error, request_id)]

    def _user(self) -> str:
        assert self.user_id is not None  # authentication guarantees it for these frames
        return self.user_id

    # ------------------------------------------------------------------ binding

    def _start_binding(
        self, identity: Identity, now: ev.Instant, frame: protocol.ClientFrame | None
    ) -> list[ev.Command]:
        self.state = State.BINDING
        self.user_id = identity.user_id
        self._expiry_deadline = _deadline_of(identity, now)
        self._after_bind = frame
        self._parked.clear()
        return [ev.Subscribe(identity)]

    def _subscribed(self, event: ev.Subscribed, now: ev.Instant) -> list[ev.Command]:
        plan, user_id = event.plan, self._user()
        self._user_bucket = event.bucket
        self._snapshot_marks = dict(plan.high_water)
        self._backlog_chats = plan.chat_ids
        self._backlog_todo = list(reversed(plan.message_chats))
        self._updates_todo = list(reversed(plan.update_chats))
        self._updates_pending = {chat_id for chat_id, _, _ in plan.update_chats}
        self._sent_versions = {}
        self.backlog_chats, self.backlog_messages = len(plan.chats), 0
        commands: list[ev.Command] = [ev.Reply(protocol.Authenticated(user_id), "authenticated")]
        if plan.chats:
            commands.append(
                ev.Reply(
                    protocol.NewChats(plan.chats),
                    "new_chats",
                    Receipt(user_id, chat_ids=tuple(chat.chat_id for chat in plan.chats)),
                )
            )
        return commands + self._next_backlog_read(now)

    def _next_backlog_read(self, now: ev.Instant) -> list[ev.Command]:
        """One chat at a time: each is read only once the previous one is queued, so a large
        backlog is read as fast as the client takes it, never whole. New messages first,
        then the changes to messages the user had (the protocol's order)."""
        if self._backlog_todo:
            chat_id, after_seq = self._backlog_todo.pop()
            up_to_seq = self._snapshot_marks[chat_id][0]
            return [ev.ReadBacklog(self._user(), chat_id, after_seq, up_to_seq)]
        if self._updates_todo:
            chat_id, after_version, up_to_seq = self._updates_todo.pop()
            up_to_version = self._snapshot_marks[chat_id][1]
            return [ev.ReadUpdates(self._user(), chat_id, after_version, up_to_version, up_to_seq)]
        self._marks = {chat_id: version for chat_id, (_, version) in self._snapshot_marks.items()}
        self._marks_until = now.monotonic + self._rules.backlog_memory_s
        return self._replay(now)

    def _backlog_read(self, event: ev.BacklogRead, now: ev.Instant) -> list[ev.Command]:
        commands: list[ev.Command] = []
        messages, chat_id = event.messages, event.chat_id
        if messages:
            self.backlog_messages += len(messages)
            newest = self._note_sent(chat_id, messages)
            last = messages[-1]
            # Every change up to the snapshot is covered once this chat's frames arrived: here,
            # unless an `updated_messages` frame of the chat follows.
            version = 0 if chat_id in self._updates_pending else newest
            mark = SeqMark(chat_id, last.seq, last.message_id, version, first=messages[0].seq)
            commands.append(
                ev.Reply(
                    protocol.NewMessages(chat_id, messages),
                    "new_messages",
                    Receipt(self._user(), marks=(mark,)),
                )
            )
        return commands + self._next_backlog_read(now)

    def _updates_read(self, event: ev.UpdatesRead, now: ev.Instant) -> list[ev.Command]:
        commands: list[ev.Command] = []
        messages, chat_id = event.messages, event.chat_id
        if messages:
            newest = self._note_sent(chat_id, messages)
            commands.append(
                ev.Reply(
                    protocol.UpdatedMessages(chat_id, messages),
                    "updated_messages",
                    Receipt(self._user(), marks=(SeqMark(chat_id, version=newest),)),
                )
            )
        return commands + self._next_backlog_read(now)

    def _note_sent(self, chat_id: str, messages: tuple[protocol.Message, ...]) -> int:
        """Remember the messages read in a state newer than the snapshot (changed while the
        binding read them): their live `message_updated` up to that state is dropped. Returns
        the chat's version in the snapshot."""
        snapshot_version = self._snapshot_marks[chat_id][1]
        for message in messages:
            if message.version > snapshot_version:
                self._sent_versions[message.message_id] = message.version
        return snapshot_version

    def _replay(self, now: ev.Instant) -> list[ev.Command]:
        parked, self._parked = self._parked, []
        writes: list[ev.Command] = []
        for item in parked:
            kept = self._cover(item, now.monotonic)
            if kept is not None:
                writes.append(ev.Write(kept))
        return [*writes, ev.Replay()]

    def _replayed(self, now: ev.Instant) -> list[ev.Command]:
        if self._parked:
            return self._replay(now)  # more arrived while the replay was written
        self.state = State.BOUND
        frame, self._after_bind = self._after_bind, None
        if frame is None:
            return []
        try:
            return self._serve(frame)
        except ProtocolError as error:
            return [_error_reply(error.with_request_id(frame.request_id))]

    def _subscribe_failed(self, error: Exception) -> list[ev.Command]:
        frame = self._after_bind
        self._unbind()
        return [ev.Unsubscribe(), *self._failure(error, frame.request_id if frame else None)]

    def _unbind(self) -> None:
        self.state = State.UNBOUND
        self.user_id = None
        self._token = None
        self._expiry_deadline = math.inf
        self._user_bucket = None
        self._after_bind = None
        self._parked.clear()
        self._backlog_todo.clear()
        self._updates_todo.clear()

    # ------------------------------------------------------------------ fan-out

    def fan_out(self, item: Outgoing, now: float) -> Outgoing | ev.DropSlow | None:
        """`handle(FanOut(item), now)` without the event and the lists: the hub calls it for
        every item it fans out, synchronously. Returns the item to push (`item` itself, or the
        receipt it carries, see `_cover`), `DropSlow`, or None (parked or dropped): only
        commands that never wait. `now` is monotonic."""
        state = self.state
        if state is State.BOUND:
            if self._marks:
                return self._cover(item, now)
            return item
        if state is State.UNBOUND:
            return None  # late fan-out for a binding that failed
        if item.frame_type == TYPING:
            return None  # never replayed, and never the reason for a drop
        if len(self._parked) >= self._rules.park_capacity:
            return _DROP_SLOW
        self._parked.append(item)
        return None

    def _cover(self, item: Outgoing, now: float) -> Outgoing | None:
        """Step 4 of the binding rule: what to send of `item`. None when the snapshot covered
        it (it is in the backlog, or reached the user before). A change the backlog already
        carried (a message read in a newer state than the snapshot) is not sent again, but
        its receipt is, as a frame of no bytes (`MARK_ONLY`): it records, in its place in the
        stream, that this change reached the user."""
        if now > self._marks_until:
            if self._marks:
                self._marks = {}
                self._sent_versions = {}
            return item
        version = item.version
        if version is None:
            # A receipt or a change of members: never part of a backlog. Except a group one
            # was added to: the backlog carries it when the snapshot had it as a new chat.
            if item.frame_type == "new_chats" and item.chat_id in self._backlog_chats:
                return None
            return item
        newest = self._marks.get(item.chat_id or "")
        if newest is None:
            return item  # a chat created after the snapshot
        if version <= newest:
            return None
        message_id = item.message_id
        if message_id is None or self._sent_versions.get(message_id, 0) < version:
            return item
        return None if item.receipt is None else Outgoing("", MARK_ONLY, item.receipt)


def _deadline_of(identity: Identity, now: ev.Instant) -> float:
    """The token's `exp` (wall clock) as a deadline on the monotonic clock."""
    if identity.expires_at is None:
        return math.inf
    return now.monotonic + (identity.expires_at - now.wall)
