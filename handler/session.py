"""One connection's protocol state machine: authentication, binding, limits, frame handling.

Transport-agnostic: it reads decoded text from the transport and writes through its
`Connection`. Theory of operation:

    UNBOUND --(valid token in query or frame)--> BINDING --(backlog written)--> BOUND

- UNBOUND: only `ping` is served; other frames get `unauthorized`. After `auth_timeout_s`
  the transport closes with 1008.
- BINDING: `Hub.register` subscribes the user, then the backlog is read and written
  (`authenticated`, `new_chats`, `new_messages`), then parked live events are replayed.
- BOUND: every frame type is served. A frame with a valid token for the same user and a later
  `exp` extends the connection's life; a token for another user is `forbidden`.

Every frame first passes the rate limiter (per user once bound, per connection before), so a
flood of garbage costs the same as a flood of valid frames.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import OrderedDict
from typing import Final

import attrs
import trio

from handler import protocol
from handler.auth import Identity, TokenAuthority
from handler.bus.base import Delivery
from handler.config import LimitsConfig
from handler.connection import Connection, Outgoing, Receipt
from handler.errors import CloseCode, ErrorCode, HandlerError, ProtocolError
from handler.hub import ConnectionLimitReached, Hub
from handler.metrics import Metrics
from handler.ratelimit import TokenBucket
from handler.single_process import ProcessLock
from handler.store.base import Store

log = logging.getLogger("handler.session")

_CHAT_CACHE_SIZE: Final = 100_000
# What a second `fetch_chats` during the first is told to wait; the first one's pace is the
# client's own reading speed, so this is a hint, not a promise.
FETCH_RETRY_MS: Final = 1000


class ChatCache:
    """Chats never change once created, so lookups on the hot path skip the database."""

    def __init__(self, store: Store, size: int = _CHAT_CACHE_SIZE) -> None:
        self._store = store
        self._size = size
        self._chats: OrderedDict[str, protocol.Chat] = OrderedDict()

    async def get(self, chat_id: str) -> protocol.Chat | None:
        chat = self._chats.get(chat_id)
        if chat is not None:
            self._chats.move_to_end(chat_id)
            return chat
        chat = await self._store.get_chat(chat_id)
        if chat is not None:
            self.put(chat)
        return chat

    def put(self, chat: protocol.Chat) -> None:
        self._chats[chat.chat_id] = chat
        if len(self._chats) > self._size:
            self._chats.popitem(last=False)


@attrs.define
class Services:
    """What every session shares within one process."""

    store: Store
    hub: Hub
    authority: TokenAuthority
    limits: LimitsConfig
    metrics: Metrics
    chats: ChatCache
    allowed_origins: tuple[str, ...] = ()
    process_lock: ProcessLock | None = None
    protocol_limits: protocol.Limits = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.protocol_limits = self.limits.protocol_limits()  # one instance, shared


def _reply(
    frame: protocol.ServerFrame, frame_type: str, receipt: Receipt | None = None
) -> Outgoing:
    return Outgoing(protocol.encode(frame), frame_type, receipt)


class Session:
    __slots__ = (
        "_auth_deadline",
        "_expiry_deadline",
        "_fetching",
        "_idle_deadline",
        "_own_bucket",
        "_protocol_limits",
        "_token",
        "background",
        "connection",
        "services",
    )

    def __init__(self, connection: Connection, services: Services) -> None:
        self.connection = connection
        self.services = services
        self._protocol_limits = services.protocol_limits
        now = trio.current_time()
        self._auth_deadline = now + services.limits.auth_timeout_s
        self._idle_deadline = now + services.limits.idle_timeout_s
        self._expiry_deadline = math.inf
        self._token: str | None = None  # the last verified token, to skip re-verifying it
        self._own_bucket = TokenBucket(services.limits.rate_per_s, services.limits.rate_burst)
        self._fetching = False  # a fetch_chats answer is being sent
        # The connection's nursery, for answers produced while the reader goes on.
        self.background: trio.Nursery | None = None

    @property
    def user_id(self) -> str | None:
        return self.connection.user_id

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float:
        if self.user_id is None or self.connection.binding:
            return min(self._idle_deadline, self._auth_deadline)
        return min(self._idle_deadline, self._expiry_deadline)

    def deadline_close(self, now: float) -> tuple[CloseCode, str] | None:
        """Which deadline passed, if any, as the close to send."""
        if now >= self._idle_deadline:
            return CloseCode.POLICY_VIOLATION, "idle timeout: send ping to stay connected"
        if self.user_id is None and now >= self._auth_deadline:
            return CloseCode.POLICY_VIOLATION, "not authenticated in time"
        if self.user_id is not None and now >= self._expiry_deadline:
            return CloseCode.POLICY_VIOLATION, "token expired"
        return None

    def data_received(self) -> None:
        self._idle_deadline = trio.current_time() + self.services.limits.idle_timeout_s

    # ------------------------------------------------------------------ entry points

    async def start(self, query_token: str | None) -> None:
        """Authenticate with the upgrade request's `?token=`, if one was given."""
        if query_token is None:
            return
        try:
            identity = self._verify(query_token)
            await self._bind(identity, query_token)
        except ProtocolError as error:
            await self._send_error(error)
        except Exception as error:  # one client must never take the server down
            await self._internal(error)

    async def handle_text(self, text: str | bytes) -> None:
        """Process one client message; never raises for anything a client can send."""
        metrics = self.services.metrics
        try:
            frame: protocol.ClientFrame | None = protocol.decode(text, self._protocol_limits)
            decode_error: ProtocolError | None = None
        except ProtocolError as error:
            frame, decode_error = None, error
        frame_type = frame.type if frame is not None else "invalid"
        metrics.count_in(frame_type)
        wait_s = self._bucket().take(trio.current_time())
        if wait_s > 0:
            await self._send_error(
                ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"too many frames; limit is {self.services.limits.rate_per_s:g} per second",
                    request_id=frame.request_id if frame is not None else None,
                    retry_after_ms=max(1, math.ceil(wait_s * 1000)),
                )
            )
            return
        if decode_error is not None:
            await self._send_error(decode_error)
            return
        assert frame is not None
        try:
            await self._handle_frame(frame)
        except ProtocolError as error:
            await self._send_error(error.with_request_id(frame.request_id))
        except HandlerError as error:
            await self._internal(error, frame.request_id)
        except Exception as error:  # one client must never take the server down
            await self._internal(error, frame.request_id)

    # ------------------------------------------------------------------ auth

    def _bucket(self) -> TokenBucket:
        if self.user_id is not None:
            bucket = self.services.hub.bucket_for(self.user_id)
            if bucket is not None:
                return bucket
        return self._own_bucket

    def _verify(self, token: str) -> Identity:
        return self.services.authority.verify(token)

    async def _authenticate(self, frame: protocol.ClientFrame) -> None:
        token = frame.token
        if token is None:
            if self.user_id is None and frame.type != "ping":
                raise ProtocolError(
                    ErrorCode.UNAUTHORIZED,
                    "not authenticated: send a token in this frame or in ?token=",
                    field="token",
                )
            return
        if token == self._token:
            if self._expiry_deadline <= trio.current_time():
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "invalid token: expired")
            return
        identity = self._verify(token)
        if self.user_id is None:
            await self._bind(identity, token)
        elif identity.user_id != self.user_id:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "this connection is bound to another user; open a new connection",
                field="token",
            )
        else:
            # In-band refresh: the connection lives until the latest expiry it was shown.
            self._token = token
            self._expiry_deadline = max(self._expiry_deadline, _trio_deadline(identity))

    async def _bind(self, identity: Identity, token: str) -> None:
        connection = self.connection
        hub = self.services.hub
        store = self.services.store
        user_id = identity.user_id
        self._token = token
        self._expiry_deadline = _trio_deadline(identity)
        try:
            await hub.register(connection, user_id)
            await hub.sync_marks(user_id)
            await hub.bus.settle(user_id)  # and the other nodes' marks for the user
            plan = await store.backlog_plan(user_id)
        except BaseException:
            await self._unbind()
            raise
        await connection.reply(_reply(protocol.Authenticated(user_id), "authenticated"))
        if plan.chats:
            await connection.reply(
                _reply(
                    protocol.NewChats(plan.chats),
                    "new_chats",
                    Receipt(user_id, chat_ids=tuple(plan.chat_ids)),
                )
            )
        # Chat by chat, each read only once the previous one is queued: the outbox is bounded
        # in bytes, so a large backlog is read as fast as the client takes it, never whole.
        count = 0
        for chat_id, oldest in plan.message_chats:
            try:
                messages = await store.undelivered(
                    user_id, chat_id, oldest, plan.high_water[chat_id]
                )
            except HandlerError:
                # Part of the backlog is out already: the client must bind again to get the
                # rest exactly once. Nothing unwritten was marked, so nothing is lost.
                await self._unbind()
                connection.close(CloseCode.INTERNAL_ERROR, "backlog unavailable; reconnect")
                raise
            if messages:
                count += len(messages)
                await connection.reply(
                    _reply(
                        protocol.NewMessages(chat_id, messages),
                        "new_messages",
                        Receipt(user_id, message_ids=tuple(m.message_id for m in messages)),
                    )
                )
        await connection.finish_binding(plan.high_water)
        log.debug(  # the close line names the user; INFO stays at one line per open/close
            "bound conn=%s user=%s backlog_chats=%d backlog_messages=%d",
            connection.id,
            user_id,
            len(plan.chats),
            count,
        )

    async def _unbind(self) -> None:
        self.connection.abort_binding()
        await self.services.hub.unregister(self.connection)
        self._token = None
        self._expiry_deadline = math.inf

    # ------------------------------------------------------------------ frames

    async def _handle_frame(self, frame: protocol.ClientFrame) -> None:
        await self._authenticate(frame)
        match frame:
            case protocol.Ping():
                await self.connection.reply(_reply(protocol.Pong(frame.request_id), "pong"))
            case protocol.CreateChat():
                await self._create_chat(frame)
            case protocol.SendMessage():
                await self._send_message(frame)
            case protocol.FetchChats():
                await self._fetch_chats(frame)
            case protocol.FetchMessages():
                await self._fetch_messages(frame)

    def _require_user(self) -> str:
        user_id = self.user_id
        assert user_id is not None  # _authenticate guarantees it for non-ping frames
        return user_id

    async def _chat_of_user(self, chat_id: str, user_id: str) -> protocol.Chat:
        chat = await self.services.chats.get(chat_id)
        if chat is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, "no such chat", field="chat_id")
        if user_id not in chat.participants:
            raise ProtocolError(
                ErrorCode.FORBIDDEN, "you are not a participant of this chat", field="chat_id"
            )
        return chat

    async def _create_chat(self, frame: protocol.CreateChat) -> None:
        user_id = self._require_user()
        if frame.recipient_id == user_id:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "cannot create a chat with yourself", field="recipient_id"
            )
        chat, created = await self.services.store.create_chat(user_id, frame.recipient_id)
        self.services.chats.put(chat)
        await self.connection.reply(
            _reply(
                protocol.NewChats((chat,), frame.request_id),
                "new_chats",
                Receipt(user_id, chat_ids=(chat.chat_id,)),
            )
        )
        if created:
            self.services.hub.bus.publish_nowait(
                Delivery(
                    "chat",
                    recipients=(frame.recipient_id, user_id),
                    chat=chat,
                    origin_connection=self.connection.id,
                )
            )

    async def _send_message(self, frame: protocol.SendMessage) -> None:
        user_id = self._require_user()
        chat = await self._chat_of_user(frame.chat_id, user_id)
        recipient_id = chat.other_participant(user_id)
        if frame.recipient_id != recipient_id:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                "recipient_id is not the other participant of this chat",
                field="recipient_id",
            )
        bus = self.services.hub.bus
        origin = self.connection.id

        def publish(message: protocol.Message, previous_id: str | None) -> None:
            bus.publish_nowait(
                Delivery(
                    "message",
                    recipients=(recipient_id, user_id),
                    message=message,
                    origin_connection=origin,
                    origin_request_id=frame.request_id,
                    prev_message_id=previous_id,
                )
            )

        started = trio.current_time()
        message, created = await self.services.store.add_message(
            chat, user_id, frame.content, frame.client_message_id, on_commit=publish
        )
        self.services.metrics.commit_latency.observe(trio.current_time() - started)
        if not created:
            # Idempotent resend: the sender gets the stored message again, nobody else does.
            await self.connection.reply(
                _reply(protocol.MessageEvent(message, frame.request_id), "message")
            )

    async def _fetch_chats(self, frame: protocol.FetchChats) -> None:
        """`all_chats` now; the `all_messages` frames from a task of the connection, one chat
        page at a time as the client reads them (one such task per connection)."""
        user_id = self._require_user()
        if self._fetching:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "a fetch_chats is still being answered on this connection; wait for its"
                " all_messages frames",
                retry_after_ms=FETCH_RETRY_MS,
            )
        chats = await self.services.store.chats_of(user_id)
        for chat in chats:
            self.services.chats.put(chat)
        await self.connection.reply(
            _reply(
                protocol.AllChats(tuple(chats), frame.request_id),
                "all_chats",
                Receipt(user_id, chat_ids=tuple(chat.chat_id for chat in chats)),
            )
        )
        if chats and self.background is not None:
            self._fetching = True
            self.background.start_soon(self._send_histories, frame, user_id, chats)
        elif chats:  # no connection nursery (a driver without one): answer inline
            await self._send_histories(frame, user_id, chats)

    async def _send_histories(
        self, frame: protocol.FetchChats, user_id: str, chats: list[protocol.Chat]
    ) -> None:
        try:
            for chat in chats:
                page = await self.services.store.messages_before(chat.chat_id, None, frame.limit)
                messages, has_more = page or ((), False)
                await self.connection.reply(
                    _reply(
                        protocol.AllMessages(chat.chat_id, messages, has_more, frame.request_id),
                        "all_messages",
                        _received(user_id, messages),
                    )
                )
        except Exception as error:  # one client must never take the server down
            await self._internal(error, frame.request_id)
        finally:
            self._fetching = False

    async def _fetch_messages(self, frame: protocol.FetchMessages) -> None:
        user_id = self._require_user()
        await self._chat_of_user(frame.chat_id, user_id)
        page = await self.services.store.messages_before(frame.chat_id, frame.before, frame.limit)
        if page is None:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "before is not a message of this chat", field="before"
            )
        messages, has_more = page
        await self.connection.reply(
            _reply(
                protocol.AllMessages(frame.chat_id, messages, has_more, frame.request_id),
                "all_messages",
                _received(user_id, messages),
            )
        )

    # ------------------------------------------------------------------ errors

    async def _send_error(self, error: ProtocolError) -> None:
        self.services.metrics.errors.labels(str(error.code)).inc()
        log.info(
            "error conn=%s user=%s code=%s field=%s",
            self.connection.id,
            self.user_id,
            error.code,
            error.field,
        )
        await self.connection.reply(_reply(protocol.ErrorFrame.from_error(error), "error"))
        if isinstance(error, ConnectionLimitReached):
            await self.connection.close_when_written(
                CloseCode.POLICY_VIOLATION, "too many connections"
            )

    async def _internal(
        self, error: BaseException, request_id: protocol.RequestId | None = None
    ) -> None:
        correlation_id = secrets.token_hex(6)
        if isinstance(error, HandlerError):
            log.error(
                "internal conn=%s user=%s correlation=%s: %s",
                self.connection.id,
                self.user_id,
                correlation_id,
                error,
            )
        else:
            log.exception(
                "internal conn=%s user=%s correlation=%s",
                self.connection.id,
                self.user_id,
                correlation_id,
                exc_info=error,
            )
        await self._send_error(
            ProtocolError(
                ErrorCode.INTERNAL,
                f"internal server error (correlation id {correlation_id}); try again",
                request_id=request_id,
            )
        )


def _trio_deadline(identity: Identity) -> float:
    """The token's `exp` (wall clock) as a deadline on the Trio clock."""
    if identity.expires_at is None:
        return math.inf
    return trio.current_time() + (identity.expires_at - time.time())


def _received(user_id: str, messages: tuple[protocol.Message, ...]) -> Receipt | None:
    """The receipt for the messages addressed to `user_id` among those returned."""
    ids = tuple(m.message_id for m in messages if m.recipient_id == user_id)
    return Receipt(user_id, message_ids=ids) if ids else None
