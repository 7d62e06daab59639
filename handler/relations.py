"""What a node knows of its bound users' relations: whom each blocks and is blocked by, and
their contacts (who shares a chat with them), with the reverse index presence fans out by.

Loaded from the store, in one read, when a user's first connection binds here (in the
background: binding does not wait for it; what needs it waits for `ready`) if presence is on,
else when first needed (a typing check), forgotten when the last connection leaves,
and kept current by the committed events the hub passes on (new chats, members, blocks), on
every node that serves either side. The store stays the truth: the writer refuses a message
across a block by itself; this copy serves what never reaches the writer (typing, presence).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, Protocol

import trio

from handler.protocol import BlockChange, Chat, GroupChange

log = logging.getLogger("handler.relations")

_LOAD_RETRY_S: Final = 1.0


class RelationsStore(Protocol):
    async def relations_of(
        self, user_id: str, *, with_contacts: bool
    ) -> tuple[frozenset[str], frozenset[str], dict[str, int]]: ...

    async def contacts_of(self, user_id: str) -> dict[str, int]: ...


class UserRelations:
    """One bound user's relations (see the module docstring)."""

    __slots__ = ("block_changes", "blocked_by", "blocks", "contacts", "loading", "ready")

    def __init__(self) -> None:
        self.blocks: set[str] = set()
        self.blocked_by: set[str] = set()
        self.contacts: set[str] = set()
        self.ready = trio.Event()
        self.loading = False
        self.block_changes = 0  # bumped by every block event: a read that overlapped one is redone

    def apart(self, other: str) -> bool:
        """Whether a block stands between the user and `other`, either way."""
        return other in self.blocks or other in self.blocked_by


class Relations:
    """See the module docstring."""

    def __init__(self, store: RelationsStore, *, with_contacts: bool) -> None:
        self._store = store
        self._with_contacts = with_contacts
        self._users: dict[str, UserRelations] = {}
        self._watchers: dict[str, set[str]] = {}  # contact -> bound users who have them
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ lifecycle

    def bind(self, user_id: str, nursery: trio.Nursery) -> None:
        """The user's first connection here bound: with presence on, load their relations in
        the background (its live changes need the contacts); else on first need."""
        self._nursery = nursery
        if user_id in self._users:
            return
        relations = self._users[user_id] = UserRelations()
        if self._with_contacts:
            self._start_load(user_id, relations)

    def _start_load(self, user_id: str, relations: UserRelations) -> None:
        if relations.loading or relations.ready.is_set() or self._nursery is None:
            return
        relations.loading = True
        self._nursery.start_soon(self._load, user_id, relations)

    def forget(self, user_id: str) -> None:
        relations = self._users.pop(user_id, None)
        if relations is not None:
            self._set_contacts(user_id, relations, set())
            relations.ready.set()  # anyone still waiting goes on with what is there

    async def _load(self, user_id: str, relations: UserRelations) -> None:
        while self._users.get(user_id) is relations:
            changes = relations.block_changes
            try:
                blocks, blocked_by, contacts = await self._store.relations_of(
                    user_id, with_contacts=self._with_contacts
                )
            except Exception as error:  # the store is down: try again while the user is here
                log.warning("loading the relations of user=%s failed: %r", user_id, error)
                await trio.sleep(_LOAD_RETRY_S)
                continue
            if self._users.get(user_id) is not relations:
                return
            if relations.block_changes != changes:
                continue  # a block changed while reading: the read may predate it
            relations.blocks = set(blocks)
            relations.blocked_by = set(blocked_by)
            self._set_contacts(user_id, relations, relations.contacts | set(contacts))
            relations.ready.set()
            return

    async def reload_contacts(self, user_id: str) -> None:
        """Read the user's contacts again (a group lost a member: do they still share a
        chat with them?)."""
        relations = self._users.get(user_id)
        if relations is None or not self._with_contacts:
            return
        try:
            contacts = set(await self._store.contacts_of(user_id))
        except Exception as error:
            log.warning("reloading the contacts of user=%s failed: %r", user_id, error)
            return
        if self._users.get(user_id) is relations:
            self._set_contacts(user_id, relations, contacts)

    # ------------------------------------------------------------------ reading

    def get(self, user_id: str) -> UserRelations | None:
        return self._users.get(user_id)

    async def ready(self, user_id: str) -> UserRelations | None:
        """The user's relations once loaded (None if the user is not bound here)."""
        relations = self._users.get(user_id)
        if relations is not None:
            self._start_load(user_id, relations)
            await relations.ready.wait()
        return relations

    def watchers_of(self, user_id: str) -> Iterable[str]:
        """The bound users here who have `user_id` as a contact."""
        return self._watchers.get(user_id, ())

    # ------------------------------------------------------------------ committed events

    def chat_created(self, chat: Chat, users: Iterable[str]) -> None:
        """A new chat for `users` (those of its participants the event is for here)."""
        self._met(users, chat.participants, chat.participants)

    def members_changed(
        self, change: GroupChange, users: Iterable[str], nursery: trio.Nursery
    ) -> None:
        """New members and the group's members become contacts; a removed member may stop
        being one (unless another chat is shared): those are read again. `users`: whom the
        event is for here (a copy from another node names one)."""
        users = tuple(users)
        members = change.view.chat.participants
        self._met(users, change.added, members)
        if not change.removed or not self._with_contacts:
            return
        for user_id in users:
            relations = self._users.get(user_id)
            if relations is not None and (
                user_id in change.removed or not relations.contacts.isdisjoint(change.removed)
            ):
                nursery.start_soon(self.reload_contacts, user_id)

    def block_changed(self, change: BlockChange) -> None:
        blocker = self._users.get(change.blocker)
        blocked = self._users.get(change.blocked)
        for relations in (blocker, blocked):
            if relations is not None:
                relations.block_changes += 1
        if blocker is not None:
            if change.on:
                blocker.blocks.add(change.blocked)
            else:
                blocker.blocks.discard(change.blocked)
        if blocked is not None:
            if change.on:
                blocked.blocked_by.add(change.blocker)
            else:
                blocked.blocked_by.discard(change.blocker)

    def _met(self, users: Iterable[str], newcomers: Iterable[str], members: Iterable[str]) -> None:
        """`newcomers` joined `members`: for each of `users` bound here, the other side
        are contacts now."""
        if not self._with_contacts:
            return
        newcomers = tuple(newcomers)
        members = tuple(members)
        for user_id in set(users):
            if user_id not in newcomers and user_id not in members:
                continue
            relations = self._users.get(user_id)
            if relations is None:
                continue
            others = members if user_id in newcomers else newcomers
            gained = {other for other in others if other != user_id} - relations.contacts
            if gained:
                self._set_contacts(user_id, relations, relations.contacts | gained)

    def _set_contacts(self, user_id: str, relations: UserRelations, contacts: set[str]) -> None:
        gained = frozenset(contacts - relations.contacts)
        lost = frozenset(relations.contacts - contacts)
        if not gained and not lost:
            return
        for contact in gained:
            self._watchers.setdefault(contact, set()).add(user_id)
        for contact in lost:
            watchers = self._watchers.get(contact)
            if watchers is not None:
                watchers.discard(user_id)
                if not watchers:
                    del self._watchers[contact]
        relations.contacts = contacts
