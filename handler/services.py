"""What every connection of one process shares: store, hub, token authority, limits, metrics.

Also the chat cache: a direct chat never changes once created, so the lookups on the hot path
(every `send_message` names its chat) skip the database. A group's members change, on any
node: a group is read from the store each time (and its writes check membership again in the
writer's transaction).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import attrs

from handler import protocol
from handler.auth import TokenAuthority
from handler.config import LimitsConfig
from handler.hub import Hub
from handler.metrics import Metrics
from handler.single_process import ProcessLock
from handler.store.base import Store

_CHAT_CACHE_SIZE: Final = 100_000


class ChatCache:
    """A bounded LRU of chats in front of `Store.get_chat`."""

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
        if chat.is_group:
            return  # its members change (on any node): always read from the store
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
