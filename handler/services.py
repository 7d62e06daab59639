"""What every connection of one process shares: store, hub, token authority, limits, metrics.

Also the chat cache: a direct chat never changes once created, so the lookups on the hot path
(every `send_message` names its chat) skip the database. A group's members change, on any
node, so a group is kept for `GROUP_TTL_S` only, and dropped at once when a change of its
members passes through this node's hub (which it does whenever a user acting here is or was a
member: they are among its recipients). Every write to a group checks membership again in the
writer's transaction, so the cache only decides whom a typing signal reaches and who is
refused early.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import attrs
import trio

from handler import protocol
from handler.auth import TokenAuthority
from handler.config import LimitsConfig
from handler.hub import Hub
from handler.metrics import Metrics
from handler.single_process import ProcessLock
from handler.store.base import Origin, Store
from handler.webhooks.delivery import WebhookService

_CHAT_CACHE_SIZE: Final = 100_000
GROUP_TTL_S: Final = 5.0


class ChatCache:
    """A bounded LRU of chats in front of `Store.get_chat`."""

    def __init__(self, store: Store, size: int = _CHAT_CACHE_SIZE) -> None:
        self._store = store
        self._size = size
        self._chats: OrderedDict[str, protocol.Chat] = OrderedDict()
        self._groups: dict[str, tuple[float, protocol.Chat]] = {}  # chat id -> (read at, chat)

    async def get(self, chat_id: str) -> protocol.Chat | None:
        chat = self._chats.get(chat_id)
        if chat is not None:
            self._chats.move_to_end(chat_id)
            return chat
        group = self._groups.get(chat_id)
        if group is not None and trio.current_time() - group[0] < GROUP_TTL_S:
            return group[1]
        chat = await self._store.get_chat(chat_id)
        if chat is not None:
            self.put(chat)
        return chat

    def put(self, chat: protocol.Chat) -> None:
        if chat.is_group:
            groups = self._groups
            if len(groups) >= self._size:
                groups.clear()  # short-lived entries: starting afresh costs a read each
            groups[chat.chat_id] = (trio.current_time(), chat)
            return
        self._chats[chat.chat_id] = chat
        if len(self._chats) > self._size:
            self._chats.popitem(last=False)

    def forget_group(self, chat_id: str | None) -> None:
        """A group's members changed (None: this node may have missed such changes)."""
        if chat_id is None:
            self._groups.clear()
        else:
            self._groups.pop(chat_id, None)


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
    webhooks: WebhookService | None = None
    protocol_limits: protocol.Limits = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.protocol_limits = self.limits.protocol_limits()  # one instance, shared

    # The store calls whose result needs more than the store gives, shared by a connection's
    # driver and the HTTP API, so both answer the same.

    async def create_chat(
        self, creator_id: str, recipient_id: str, origin: Origin
    ) -> tuple[protocol.ChatView, bool]:
        """The pair's direct chat, created or found, as the creator's chat object; `True`
        when it was created now."""
        chat, created = await self.store.create_chat(creator_id, recipient_id, origin)
        self.chats.put(chat)
        view = None if created else await self.store.chat_view(chat.chat_id, creator_id)
        return view or protocol.ChatView.fresh(chat), created

    async def chats_of(self, user_id: str) -> tuple[protocol.ChatView, ...]:
        """Every chat of the user, most recently active first (and into the chat cache)."""
        chats = await self.store.chats_of(user_id)
        for view in chats:
            self.chats.put(view.chat)
        return tuple(chats)
