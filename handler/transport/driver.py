"""The Trio driver of one connection's session machine: feeds it events, carries out commands.

The rules live in `handler.session.machine`; this module only does what it is told, with
I/O: the store, the hub, the outbox and the clock. Results of commands are fed back before
anything else, so the machine sees each request's steps in order. Two tasks feed it: the
connection's reader (frames, deadlines, and the commands they lead to, one frame at a time)
and, for a `fetch_chats` answer, one history stream in the connection's nursery; the hub
feeds fan-out synchronously through `deliver_nowait`. Each `handle` call is atomic (no
await inside), so their interleaving needs no lock.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Final

import trio

from handler import protocol
from handler.connection import Connection, Outgoing
from handler.errors import HandlerError, ProtocolError
from handler.services import Services
from handler.session import events as ev
from handler.session.machine import SessionMachine, SessionRules, internal_error
from handler.store.base import Origin

log = logging.getLogger("handler.session")


_REQUESTS: Final = (
    ev.LoadChat,
    ev.StoreChat,
    ev.StoreGroup,
    ev.StoreMembers,
    ev.StoreMessage,
    ev.StoreRead,
    ev.StoreChange,
    ev.ListChats,
    ev.ReadPage,
    ev.SendTyping,
    ev.ReadPresence,
    ev.StoreBlock,
)


# Writes whose acknowledgement is their fan-out (the hub's copy for the origin connection).
_FANNED_OUT: Final = (
    ev.StoreMessage,
    ev.StoreChat,
    ev.StoreGroup,
    ev.StoreMembers,
    ev.StoreRead,
    ev.StoreChange,
    ev.StoreBlock,
)


def rules_of(services: Services) -> SessionRules:
    limits = services.limits
    return SessionRules(
        auth_timeout_s=limits.auth_timeout_s,
        idle_timeout_s=limits.idle_timeout_s,
        rate_per_s=limits.rate_per_s,
        rate_burst=limits.rate_burst,
        park_capacity=limits.send_queue,
    )


def now() -> ev.Instant:
    return ev.Instant(trio.current_time(), time.time())


class SessionDriver:
    """Carries out one `SessionMachine`'s commands; the hub's `Endpoint` for its connection."""

    __slots__ = ("_background", "_home", "_services", "connection", "machine")

    def __init__(self, connection: Connection, services: Services, home: trio.Nursery) -> None:
        self.connection = connection
        self._services = services
        # The connection's nursery: its writer's first home, and where a history streams.
        self._home = home
        self.machine = SessionMachine(rules_of(services), services.authority.verify, now())

    # ------------------------------------------------------------------ events in

    async def opened(self, query_token: str | None) -> None:
        await self._feed_safely(ev.Opened(query_token))

    async def frame(self, payload: str | bytes) -> None:
        """One client message; never raises for anything a client can send."""
        services = self._services
        try:
            frame: protocol.ClientFrame | None = protocol.decode(payload, services.protocol_limits)
            event = ev.FrameReceived(frame)
        except ProtocolError as error:
            frame, event = None, ev.FrameReceived(None, error)
        services.metrics.count_in(frame.type if frame is not None else "invalid")
        try:
            await self._feed(event)
        except Exception as error:  # one client must never take the server down
            await self._report_internal(error, frame.request_id if frame is not None else None)

    async def deadline(self) -> None:
        await self._feed_safely(ev.DeadlineReached())

    async def keepalive(self) -> None:
        """Queue a WebSocket ping (the connection was quiet for `ping_interval_s`)."""
        await self.connection.writer.ensure(self._home)
        self.connection.push_ping()

    def closing(self) -> None:
        """The connection is closing: where its user was shown typing, stop it now rather
        than when the receivers' indicators expire."""
        user_id = self.machine.user_id
        if user_id is None:
            return
        hub = self._services.hub
        for chat in self.machine.typing_left_on(trio.current_time()):
            hub.stop_typing(user_id, chat)

    def deliver_nowait(self, item: Outgoing) -> None:
        """Fan-out from the hub (the machine's `fan_out`: only commands that never wait)."""
        outcome = self.machine.fan_out(item, trio.current_time())
        if outcome is None:
            return
        if isinstance(outcome, Outgoing):
            self.connection.push_nowait(outcome)
        else:
            self.connection.drop()

    async def _feed_safely(
        self, event: ev.Event, request_id: protocol.RequestId | None = None
    ) -> None:
        try:
            await self._feed(event)
        except Exception as error:  # one client must never take the server down
            await self._report_internal(error, request_id)

    async def _feed(self, event: ev.Event) -> None:
        # A stack, last command on top: a result's commands go before the ones still waiting.
        pending = self.machine.handle(event, now())
        pending.reverse()
        while pending:
            command = pending.pop()
            try:
                result = await self._carry_out(command)
            except Exception as error:
                result = _failed(command, error)
            if isinstance(command, _FANNED_OUT):
                # The commit's fan-out carries the acknowledgement; the hub's publisher was
                # woken before this task: let it run before this connection's next reply
                # (the reader may take the next frame without a pass of the run loop).
                await trio.lowlevel.checkpoint()
            if result is not None:
                pending.extend(reversed(self.machine.handle(result, now())))

    # ------------------------------------------------------------------ commands out

    async def _carry_out(self, command: ev.Command) -> ev.Event | None:
        """Do one command; return the event that reports its result, if it has one (a store
        request that raises is reported by `_failed`)."""
        connection = self.connection
        services = self._services
        store = services.store
        match command:
            case ev.Reply():
                await self._reply(command)
            case ev.LoadChat():
                return ev.ChatLoaded(command.frame, await services.chats.get(command.frame.chat_id))
            case ev.StoreMessage():
                sent = command.frame
                started = trio.current_time()
                message, created = await store.add_message(
                    command.chat,
                    command.user_id,
                    sent.content,
                    sent.client_message_id,
                    Origin(connection.id, sent.request_id),
                )
                services.metrics.commit_latency.observe(trio.current_time() - started)
                return ev.MessageStored(sent, message, created)
            case ev.StoreChat():
                view, created = await services.create_chat(
                    command.user_id,
                    command.frame.recipient_id,
                    Origin(connection.id, command.frame.request_id),
                )
                return ev.ChatStored(command.frame, view, created)
            case ev.StoreGroup():
                group = command.frame
                chat = await store.create_group(
                    command.user_id,
                    group.title,
                    group.member_ids,
                    Origin(connection.id, group.request_id),
                )
                return ev.ChatStored(group, protocol.ChatView.fresh(chat), True)
            case ev.StoreMembers():
                asked = command.frame
                origin = Origin(connection.id, asked.request_id)
                if isinstance(asked, protocol.AddMembers):
                    view, changed = await store.add_members(
                        command.chat,
                        command.user_id,
                        asked.member_ids,
                        services.limits.max_group_members,
                        origin,
                    )
                    return ev.MembersStored(asked, view, changed)
                view = await store.remove_member(
                    command.chat, command.user_id, asked.user_id, origin
                )
                return ev.MembersStored(asked, view, True)
            case ev.StoreRead():
                read = command.frame
                receipt, moved = await store.mark_read(
                    command.chat,
                    command.user_id,
                    read.message_id,
                    Origin(connection.id, read.request_id),
                )
                return ev.ReadStored(read, receipt, moved)
            case ev.StoreChange():
                change = command.frame
                origin = Origin(connection.id, change.request_id)
                if isinstance(change, protocol.EditMessage):
                    message = await store.edit_message(
                        command.chat, command.user_id, change.message_id, change.content, origin
                    )
                    return ev.ChangeStored(change, message, True)
                message, changed = await store.delete_message(
                    command.chat, command.user_id, change.message_id, origin
                )
                return ev.ChangeStored(change, message, changed)
            case ev.ListChats():
                return ev.ChatsListed(command.frame, await services.chats_of(command.user_id))
            case ev.SendTyping():
                await services.hub.typing(
                    command.user_id, command.chat, command.frame.active, forward=command.forward
                )
            case ev.ReadPresence():
                entries = await services.hub.presence.answer(
                    command.user_id, command.frame.user_ids
                )
                return ev.PresenceRead(command.frame, entries)
            case ev.StoreBlock():
                block = command.frame
                if isinstance(block, protocol.FetchBlocked):
                    return ev.BlockStored(block, await store.blocks_of(command.user_id))
                blocks, changed = await store.set_block(
                    command.user_id,
                    block.user_id,
                    isinstance(block, protocol.BlockUser),
                    services.limits.max_blocked_users,
                    Origin(connection.id, block.request_id),
                )
                return ev.BlockStored(block, blocks, changed)
            case ev.ReadPage():
                frame = command.frame
                page = await store.messages_before(
                    frame.chat_id, frame.before, frame.limit, connection.user_id
                )
                return ev.PageRead(frame, page)
            case ev.Write():
                await connection.writer.ensure(self._home)
                await connection.reply(command.item)
            case ev.Push():
                connection.push_nowait(command.item)
            case ev.DropSlow():
                connection.drop()
            case ev.Replay():
                return ev.Replayed()
            case ev.Subscribe():
                return await self._subscribe(command.identity.user_id)
            case ev.Unsubscribe():
                await services.hub.unregister(connection)
                await connection.writer.retire()  # restarted here when there is a reply
            case ev.ReadBacklog():
                messages = await store.undelivered(
                    command.user_id, command.chat_id, command.after_seq, command.up_to_seq
                )
                return ev.BacklogRead(command.chat_id, messages)
            case ev.ReadUpdates():
                messages = await store.updated(
                    command.user_id,
                    command.chat_id,
                    command.after_version,
                    command.up_to_version,
                    command.up_to_seq,
                )
                return ev.UpdatesRead(command.chat_id, messages)
            case ev.StreamHistories():
                self._home.start_soon(self._stream_histories, command)
            case ev.ReportInternal():
                await self._report_internal(command.error, command.request_id)
            case ev.Close():
                connection.close(command.code, command.reason)
            case ev.CloseWhenWritten():
                await connection.writer.ensure(self._home)
                await connection.close_when_written(command.code, command.reason)
        return None

    async def _subscribe(self, user_id: str) -> ev.Event:
        """Register with the hub, settle the marks of every node, take the backlog snapshot
        (steps 1-2 of the binding rule), then move the writer into the user's nursery."""
        services = self._services
        hub = services.hub
        try:
            entry = await hub.register(self, user_id)
            await hub.marks.sync(user_id)
            await hub.bus.settle(user_id)  # and the other nodes' marks for the user
            plan = await services.store.backlog_plan(user_id)
            hub.bus.read_at(
                user_id, {chat: version for chat, (_, version) in plan.high_water.items()}
            )
            # Nothing is written before `Subscribed` (fan-out is parked meanwhile), so the
            # writer moves last: by now the user's task has opened its nursery.
            await self.connection.writer.move_to(await hub.nursery_of(entry))
        except Exception as error:
            return ev.SubscribeFailed(error)
        return ev.Subscribed(plan, entry.bucket)

    async def _stream_histories(self, command: ev.StreamHistories) -> None:
        """The `all_messages` pages of a `fetch_chats`, each read once the previous is queued."""
        frame = command.frame
        error: Exception | None = None
        try:
            for chat_id in command.chat_ids:
                page = await self._services.store.messages_before(
                    chat_id, None, frame.limit, self.connection.user_id
                )
                messages, has_more = page or ((), False)
                await self._feed(ev.HistoryRead(frame, chat_id, messages, has_more))
        except Exception as failure:  # one client must never take the server down
            error = failure
        await self._feed(ev.HistoryDone(frame, error))

    # ------------------------------------------------------------------ replies and errors

    async def _reply(self, command: ev.Reply) -> None:
        frame = command.frame
        if isinstance(frame, protocol.ErrorFrame):
            self._services.metrics.errors.labels(str(frame.code)).inc()
            log.info(
                "error conn=%s user=%s code=%s field=%s",
                self.connection.id,
                self.machine.user_id,
                frame.code,
                frame.field,
            )
        connection = self.connection
        await connection.writer.ensure(self._home)
        await connection.reply(
            Outgoing(protocol.encode(frame), command.frame_type, command.receipt)
        )

    async def _report_internal(
        self, error: BaseException, request_id: protocol.RequestId | None
    ) -> None:
        correlation_id = secrets.token_hex(6)
        user_id = self.machine.user_id
        if isinstance(error, HandlerError):
            log.error(
                "internal conn=%s user=%s correlation=%s: %s",
                self.connection.id,
                user_id,
                correlation_id,
                error,
            )
        else:
            log.exception(
                "internal conn=%s user=%s correlation=%s",
                self.connection.id,
                user_id,
                correlation_id,
                exc_info=error,
            )
        await self._reply(ev.Reply(internal_error(correlation_id, request_id), "error"))


def _failed(command: ev.Command, error: Exception) -> ev.Event:
    """The event reporting that a store request raised; anything else is a fault."""
    if isinstance(command, _REQUESTS):
        return ev.RequestFailed(command.frame, error)
    if isinstance(command, ev.ReadBacklog | ev.ReadUpdates):
        return ev.BacklogFailed(error)
    raise error
