"""Desktop test client for the chat handler: type JSON frames, send them, watch every frame.

Run it with the server's venv (the README's quick start makes `.venv`), next to `config.json`
(it connects to that `handler_url`) or give a URL:

    .venv/bin/python test_client.py                      # handler_url from ./config.json
    .venv/bin/python test_client.py 127.0.0.1:8080 --user alice --connect

It needs what the server needs (trio, trio-websocket, h11, and `handler` itself for its frame
checks) plus Tk; without them it says how to get them and exits with status 2.

It is also the reference for talking to the handler from a desktop program, so it is built in
three layers, top to bottom:

1. Pure helpers (no I/O, unit-tested): endpoint resolution, frame templates checked against the
   server's own decoder (`handler.protocol`), the context that fills in the last chat, group
   and message ids (and keeps the chats' kinds, titles and members, the presence the server
   reported and the block list), who is typing where until when (`TypingBoard`, on a clock
   the caller passes), the sent-frame history, formatting of the frame log (with a one-line
   summary of each frame: seq, receipts, edits and deletes, unread counts, group members,
   typing, presence, blocks), reconnect backoff.
2. `Link`: the WebSocket connection in Trio with trio-websocket. One reader, one writer fed by a
   bounded channel (so the keep-alive `ping` and the person's frames never interleave badly),
   reconnect with exponential backoff and jitter, each time with the token it holds then
   (`use_token`). It knows nothing about Tk.
3. `App`: the Tk window. Trio runs in *guest mode* inside Tk's event loop: Trio tasks run on the
   Tk thread between Tk events, so they update widgets directly, and Tk callbacks hand work to
   Trio with `TrioToken.run_sync_soon`. No thread ever touches a socket or a widget it does not own.
   One Trio task of the window takes typing indicators off when their time is up.
"""

from __future__ import annotations

import argparse
import collections
import enum
import functools
import json
import math
import random
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import urlencode, urlsplit

try:
    import tkinter as tk
    from tkinter import font as tkfont
    from tkinter import scrolledtext, ttk

    import h11
    import outcome
    import trio
    import trio_websocket

    from handler import protocol
    from handler.errors import ProtocolError
except ModuleNotFoundError as missing:
    if __name__ != "__main__":
        raise
    # Run as a script by a Python without the server's packages (a stock `python3`): say how
    # to run it instead of a traceback. The packages first: the venv is the usual answer, and
    # a stock Python often lacks Tk as well.
    import importlib.util

    name = next(
        (
            package
            for package in ("h11", "outcome", "trio", "trio_websocket", "handler")
            if importlib.util.find_spec(package) is None
        ),
        missing.name,
    )
    if name in ("tkinter", "_tkinter"):
        hint = "install Tk for this Python (Debian/Ubuntu: apt-get install python3-tk)"
    else:
        hint = (
            "run it with the server's venv: .venv/bin/python test_client.py "
            "(make it with: python3 -m venv .venv && .venv/bin/pip install -e .), "
            "or pip install -e . into this Python"
        )
    print(f"test_client: cannot import {name}: {hint}", file=sys.stderr)
    sys.exit(2)

PING_INTERVAL_S: Final = 25.0
BACKOFF_BASE_S: Final = 0.5
BACKOFF_MAX_S: Final = 15.0
HTTP_TIMEOUT_S: Final = 10.0
MAX_LOG_ENTRIES: Final = 2000
OUTGOING_CAPACITY: Final = 64

# The client frame types there is a template for (every one the server knows).
TEMPLATE_TYPES: Final = (
    "create_chat",
    "send_message",
    "mark_read",
    "edit_message",
    "delete_message",
    "fetch_chats",
    "fetch_messages",
    "ping",
    "create_group",
    "add_members",
    "remove_member",
    "typing",
    "fetch_presence",
    "block_user",
    "unblock_user",
    "fetch_blocked",
)
# `fetch_chats` with `limit: 0`: only the chat list (`all_chats`, with unread counts and marks).
CHAT_LIST: Final = "fetch_chats limit 0"
# `send_message` to a group: no `recipient_id` (the server refuses one there).
GROUP_MESSAGE: Final = "send_message group"
# `fetch_presence` naming users (the contacts known from the chats) instead of asking for all.
PRESENCE_OF: Final = "fetch_presence user_ids"
# The template buttons, in four rows: writing to a chat, reading, groups, then the people
# (typing, presence, blocking). The order in a row is the order a conversation usually needs.
TEMPLATE_ROWS: Final = (
    ("create_chat", "send_message", "mark_read", "edit_message", "delete_message"),
    ("fetch_chats", CHAT_LIST, "fetch_messages", "ping"),
    ("create_group", GROUP_MESSAGE, "add_members", "remove_member"),
    ("typing", "fetch_presence", PRESENCE_OF, "block_user", "unblock_user", "fetch_blocked"),
)
# Made-up user ids the group templates offer as members, after the other person of the last
# direct chat: the first ones that are neither this user nor in the group already.
SAMPLE_USERS: Final = ("bob", "carol", "dave", "erin", "frank", "gina")


# =============================================================================== pure helpers


@dataclass(frozen=True)
class Endpoints:
    """Where the handler is: its HTTP base (for `/auth/dev-token`) and its WebSocket URL."""

    http: str
    ws: str


def resolve_endpoints(target: str | None, config_path: Path = Path("config.json")) -> Endpoints:
    """Turn a command-line target, or the `handler_url` of `config.json`, into endpoints.

    Accepts `host:port`, `http(s)://host:port` and `ws(s)://host:port/path`. A wildcard bind
    address (`0.0.0.0`, `::`) is not something to connect to, so it becomes loopback.
    """
    if target is None:
        try:
            target = str(json.loads(config_path.read_text(encoding="utf-8"))["handler_url"])
        except (OSError, ValueError, KeyError, TypeError):
            target = "127.0.0.1:8080"
    if "://" not in target:
        target = f"http://{target}"
    parts = urlsplit(target)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"not a handler address: {target!r}")
    secure = parts.scheme in ("https", "wss")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(parts.hostname, parts.hostname)
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    path = parts.path if parts.scheme in ("ws", "wss") and parts.path not in ("", "/") else "/ws"
    return Endpoints(
        http=f"{'https' if secure else 'http'}://{netloc}",
        ws=f"{'wss' if secure else 'ws'}://{netloc}{path}",
    )


def with_token(ws_url: str, token: str) -> str:
    """The upgrade URL carrying the token (`/ws?token=...`), which binds the connection at once."""
    if not token:
        return ws_url
    separator = "&" if urlsplit(ws_url).query else "?"
    return f"{ws_url}{separator}{urlencode({'token': token})}"


def backoff_delay(
    attempt: int,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_MAX_S,
    rand: Callable[[], float] = random.random,
) -> float:
    """Reconnect delay: exponential and capped; half fixed, half random ("equal jitter").

    The fixed half keeps a down server from being hammered, the random half keeps clients that
    were dropped together from all coming back in the same instant.
    """
    ceiling = min(cap, base * 2.0**attempt)
    return ceiling / 2 + rand() * ceiling / 2


POLICY_VIOLATION: Final = 1008  # the server's policy close: auth failure, token expired, idle
ABNORMAL_CLOSURE: Final = 1006  # no close frame: the connection broke


@dataclass(frozen=True)
class Closed:
    """How a connection ended: its close code and reason, and why the token was refused, if it
    was (the `unauthorized` message that came before the close)."""

    code: int
    reason: str = ""
    auth_problem: str | None = None

    def __str__(self) -> str:
        text = f"{self.code} {self.reason}".rstrip()
        return f"{text} ({self.auth_problem})" if self.auth_problem else text


class Step(enum.Enum):
    """What the link does when a connection has ended."""

    RECONNECT = "reconnect"  # after a backoff, with the link's token
    RENEW = "renew"  # get a new token, then try once more at once
    STOP = "stop"  # and ask the person for a new token


def after_close(
    closed: Closed | None, *, can_renew: bool, renewed: bool, new_token: bool = False
) -> Step:
    """The step after a connection ended (`closed` is None when it never opened).

    1008 is the server's policy close: the token was refused (the connection stayed unbound
    until `auth_timeout_s`) or expired, the connection was idle, or the user has too many.
    The same token gets the same answer, so reconnecting with it would loop forever while
    looking connected. Renew the token once when the client can (a dev token it fetched
    itself; `renewed` says that was already tried since the last binding), else stop. But
    when the person gave a new token while that connection was open (`new_token`), the
    refusal was of the old one: reconnect with the new one. Every other end is worth
    retrying with backoff: 1001 (server going away), 1006 (dropped), 1011 (server error),
    1013 (try again later), a refused or timed-out connection.
    """
    if closed is None or closed.code != POLICY_VIOLATION or new_token:
        return Step.RECONNECT
    return Step.RENEW if can_renew and not renewed else Step.STOP


@dataclass
class SignIn:
    """What one connection's frames say about signing in: who it is bound to, or why not."""

    user_id: str | None = None
    problem: str | None = None

    def observe(self, frame: Mapping[str, Any]) -> bool:
        """Take in a received frame; True when it changed what is known."""
        kind = frame.get("type")
        if kind == "authenticated" and isinstance(frame.get("user_id"), str):
            self.user_id, self.problem = frame["user_id"], None
            return True
        if kind == "error" and frame.get("code") == "unauthorized" and self.user_id is None:
            message = frame.get("message")
            self.problem = str(message) if message else "unauthorized"
            return True
        return False


# Header colours of arriving frames that are not messages as such: receipts, and the edits
# and deletes of messages already shown, changes of a group's members and of the block list;
# typing and presence, which come often and say little, are subdued (errors are red both ways).
HEADER_TAGS: Final = {
    "receipt": "receipt",
    "message_updated": "update",
    "updated_messages": "update",
    "chat_updated": "update",
    "blocked": "update",
    "typing": "activity",
    "presence": "activity",
}

ACCENT: Final = "#2f6fed"  # the browser client's accent: "bob is typing…"
AMBER: Final = "#b26a00"
GREEN: Final = "#1b8a4b"
GREY: Final = "#667085"
RED: Final = "#c62828"


def status_view(state: str, detail: str, sign_in: SignIn) -> tuple[str, str]:
    """The status line for a link state, and its colour.

    Green only once the connection is bound: an open socket whose token was refused is red,
    with the server's reason, and so is a stop after a close (with its code and reason).
    """
    if state == "connected":
        if sign_in.user_id is not None:
            return f"connected as {sign_in.user_id}", GREEN
        if sign_in.problem is not None:
            return f"connected, not signed in: {sign_in.problem}", RED
        return "connected, not signed in", AMBER
    if state == "disconnected":
        return (f"disconnected: {detail}", RED) if detail else ("disconnected", GREY)
    colour = RED if state == "waiting" else AMBER
    return (f"{state}: {detail}" if detail else state), colour


@dataclass(frozen=True)
class ChatInfo:
    """What the client keeps of one chat object: its kind, title and members."""

    kind: str  # "direct" or "group"
    title: str | None
    participants: tuple[str, ...]
    created_by: str | None = None


def chat_info(chat: Mapping[str, Any]) -> ChatInfo | None:
    """The `ChatInfo` of a chat object, or None when it has no list of participants.

    A chat object without `kind` is from a version 1 server, which has direct chats only.
    """
    participants = chat.get("participants")
    if not isinstance(participants, list) or not all(isinstance(u, str) for u in participants):
        return None
    kind = "group" if chat.get("kind") == "group" else "direct"
    title, created_by = chat.get("title"), chat.get("created_by")
    return ChatInfo(
        kind,
        title if isinstance(title, str) else None,
        tuple(participants),
        created_by if isinstance(created_by, str) else None,
    )


@dataclass(frozen=True)
class Presence:
    """One user's entry of a `presence` frame: `last_seen` is None while online, when never
    connected, and when the server does not show them to this user (a stranger, a block)."""

    online: bool
    last_seen: str | None = None


@dataclass
class Context:
    """What the frames seen so far tell us: who we are, the last chat and the other person in
    it, the newest message seen in that chat, the last message this user sent, the chats this
    user is in (`chats`, from the chat objects), the last group seen, the presence of the
    users the server told us about and the users this user blocks (None until a `blocked`).

    Templates read it so that, after `create_chat`, a `send_message` is ready to go, and after
    a message, `mark_read`, `edit_message` and `delete_message` name it; after `create_group`,
    the group templates name the group; `block_user` and `unblock_user` name the other person
    (or one already blocked). `peer` is the other person of a direct chat: groups and their
    messages do not change it.
    """

    user_id: str | None = None
    chat_id: str | None = None
    peer: str | None = None
    message_id: str | None = None  # the newest message seen in `chat_id`
    own_message: tuple[str, str] | None = None  # (chat_id, message_id) this user sent last
    chats: dict[str, ChatInfo] = field(default_factory=dict)
    group_id: str | None = None  # the last group seen
    presence: dict[str, Presence] = field(default_factory=dict)
    blocked: tuple[str, ...] | None = None  # sorted, as the server sends it

    def contacts(self) -> list[str]:
        """The users who share a chat with this user, `peer` first, then by user id."""
        others = {
            user
            for info in self.chats.values()
            for user in info.participants
            if user != self.user_id
        }
        return sorted(others, key=lambda user: (user != self.peer, user))

    def is_group(self, chat_id: str | None) -> bool:
        info = self.chats.get(chat_id) if chat_id is not None else None
        return info is not None and info.kind == "group"

    def direct_chat_id(self) -> str | None:
        """The chat a direct `send_message` goes to: the last chat, unless that is a group
        (or gone); then the direct chat with `peer`, if known."""
        if self.chat_id is not None and not self.is_group(self.chat_id):
            return self.chat_id
        for chat_id, info in self.chats.items():
            if info.kind == "direct" and self.peer in info.participants:
                return chat_id
        return None

    def observe_sent(self, frame: Mapping[str, Any]) -> None:
        if frame.get("type") == "create_chat" and isinstance(frame.get("recipient_id"), str):
            self.peer = frame["recipient_id"]

    def observe_received(self, frame: Mapping[str, Any]) -> None:
        kind = frame.get("type")
        data = frame.get("data")
        if kind == "authenticated" and isinstance(frame.get("user_id"), str):
            if frame["user_id"] != self.user_id:
                self.own_message = None  # someone else's message now: not ours to edit
                self.chats.clear()  # nor their chats
                self.group_id = None
                self.presence.clear()  # what they were shown of others
                self.blocked = None
            self.user_id = frame["user_id"]
        elif kind == "all_chats" and isinstance(data, list):
            # Every chat of the user: any other one is gone (left, or removed while away).
            self.chats.clear()
            self.group_id = None
            if data:
                self._use_chats(data, newest_first=True)
        elif kind == "new_chats" and isinstance(data, list) and data:
            self._use_chats(data, newest_first=False)
        elif kind == "chat_updated" and isinstance(data, Mapping):
            # Members were added or removed. The removed user's copy lists the members without
            # them: that chat is no longer theirs.
            chat_id = data.get("chat_id")
            if self._learn(data) is not None and isinstance(chat_id, str):
                if chat_id in self.chats:
                    if self.is_group(chat_id):
                        self.group_id = chat_id
                else:
                    self._forget_chat(chat_id)
        elif kind == "message":
            self._use_message(frame)
        elif kind == "new_messages" and isinstance(data, list) and data:
            last = data[-1]
            if isinstance(last, Mapping):
                self._use_message(last)
        elif kind == "message_updated":
            self._forget_if_deleted(frame)
        elif kind == "updated_messages" and isinstance(data, list):
            for message in data:
                if isinstance(message, Mapping):
                    self._forget_if_deleted(message)
        elif kind == "presence" and isinstance(data, list):
            # A reply lists the users asked about, a live frame the one who came or went: either
            # way only those entries change.
            for entry in data:
                presence = presence_entry(entry)
                if presence is not None:
                    self.presence[presence[0]] = presence[1]
        elif (
            kind == "blocked"
            and isinstance(data, list)
            and all(isinstance(user, str) for user in data)
        ):
            self.blocked = tuple(data)

    def _use_chats(self, data: list[Any], *, newest_first: bool) -> None:
        """Take in the chat objects of `all_chats` (newest first) or `new_chats` (oldest first):
        the newest one becomes the last chat, the newest group the last group."""
        chats = [chat for chat in data if isinstance(chat, Mapping)]
        for chat in chats:
            self._learn(chat)
        groups = [chat["chat_id"] for chat in chats if self.is_group(chat.get("chat_id"))]
        if groups:
            self.group_id = groups[0] if newest_first else groups[-1]
        newest = data[0] if newest_first else data[-1]
        if isinstance(newest, Mapping):
            self._use_chat(newest.get("chat_id"), newest.get("participants"))
            last = newest.get("last_message")
            if isinstance(last, Mapping) and last.get("chat_id") == self.chat_id:
                self._use_message_id(last)

    def _learn(self, chat: Mapping[str, Any]) -> ChatInfo | None:
        """Keep what a chat object says (None when it says nothing usable); a chat whose
        participants no longer include this user is dropped."""
        chat_id, info = chat.get("chat_id"), chat_info(chat)
        if not isinstance(chat_id, str) or info is None:
            return None
        if self.user_id is not None and self.user_id not in info.participants:
            self.chats.pop(chat_id, None)
        else:
            self.chats[chat_id] = info
        return info

    def _forget_chat(self, chat_id: str) -> None:
        """This user left the chat or was removed: the templates no longer offer it."""
        self.chats.pop(chat_id, None)
        if self.group_id == chat_id:
            self.group_id = None
        if self.chat_id == chat_id:
            self.chat_id, self.message_id = None, None
        if self.own_message is not None and self.own_message[0] == chat_id:
            self.own_message = None

    def _use_chat(self, chat_id: Any, participants: Any) -> None:
        if not isinstance(chat_id, str):
            return
        if chat_id != self.chat_id:
            self.message_id = None  # the one seen was of the previous chat
        self.chat_id = chat_id
        if self.is_group(chat_id):
            self.group_id = chat_id
        elif isinstance(participants, list):
            others = [user for user in participants if user != self.user_id]
            if others and isinstance(others[0], str):
                self.peer = others[0]

    def _use_message(self, message: Mapping[str, Any]) -> None:
        sender, recipient = message.get("sender_id"), message.get("recipient_id")
        chat_id = message.get("chat_id")
        self._use_chat(chat_id, None)
        if chat_id == self.chat_id:
            self._use_message_id(message)
        if "recipient_id" not in message:
            # Only group messages have none (whether or not the chat object was seen).
            if isinstance(chat_id, str):
                self.group_id = chat_id
            return
        other = recipient if sender == self.user_id else sender
        if isinstance(other, str):
            self.peer = other

    def _use_message_id(self, message: Mapping[str, Any]) -> None:
        """`message` (of `chat_id`) is the newest one seen there."""
        message_id, chat_id = message.get("message_id"), message.get("chat_id")
        if not isinstance(message_id, str) or not isinstance(chat_id, str):
            return
        self.message_id = message_id
        own = self.user_id is not None and message.get("sender_id") == self.user_id
        if own and message.get("deleted") is not True:
            self.own_message = (chat_id, message_id)

    def _forget_if_deleted(self, message: Mapping[str, Any]) -> None:
        # A tombstone cannot be edited: the templates should not offer it.
        if message.get("deleted") is True and self.own_message == (
            message.get("chat_id"),
            message.get("message_id"),
        ):
            self.own_message = None


def presence_entry(entry: Any) -> tuple[str, Presence] | None:
    """The user id and `Presence` of one entry of a `presence` frame's `data` (None if junk)."""
    if not isinstance(entry, Mapping) or not isinstance(entry.get("user_id"), str):
        return None
    last_seen = entry.get("last_seen")
    return entry["user_id"], Presence(
        entry.get("online") is True, last_seen if isinstance(last_seen, str) else None
    )


def context_line(context: Context) -> str:
    """What the templates will fill in, as the window shows it next to their buttons."""
    text = f"last chat: {context.chat_id or 'none yet'}  with: {context.peer or '?'}"
    if context.message_id is not None:
        text += f"  message: {context.message_id}"
    if context.own_message is not None:
        chat_id, message_id = context.own_message
        where = "" if chat_id == context.chat_id else f" (chat {chat_id})"
        text += f"  yours: {message_id}{where}"
    return text


def group_line(context: Context) -> str:
    """What the group templates will fill in, as the window shows it next to their buttons."""
    if context.group_id is None:
        return "group: none yet"
    info = context.chats.get(context.group_id)
    if info is None:  # known from a message only
        return f"group: {context.group_id}"
    title = json.dumps(info.title, ensure_ascii=False) if info.title is not None else "untitled"
    return f"group: {context.group_id} {title}, {_plural(len(info.participants), 'member')}"


MAX_NAMES_TYPING: Final = 3  # typists named in one chat; the rest are "and 2 others"


@dataclass
class TypingBoard:
    """Who is typing where, from the `typing` frames, on the clock the caller passes (`now`).

    An indicator ends when its `expires_in_ms` has passed without a renewal, with an
    `active: false`, with a `message` from the typist in that chat, and when this user blocks
    the typist. A new binding starts afresh: typing is never replayed, and a typist who still
    types renews within seconds.
    """

    # (chat_id, user_id) -> when the indicator ends; in the order they started.
    until: dict[tuple[str, str], float] = field(default_factory=dict)

    def observe(self, frame: Mapping[str, Any], now: float) -> bool:
        """Take in a received frame; True when who is typing changed (or a renewal moved it)."""
        kind, chat_id = frame.get("type"), frame.get("chat_id")
        if kind == "typing":
            user = frame.get("user_id")
            if not isinstance(chat_id, str) or not isinstance(user, str):
                return False
            if frame.get("active") is False:
                return self.until.pop((chat_id, user), None) is not None
            expires = _seq(frame.get("expires_in_ms"))
            # Without one, the server's documented value.
            ms = expires if expires is not None and expires > 0 else protocol.TYPING_EXPIRES_MS
            self.until[(chat_id, user)] = now + ms / 1000
            return True
        if kind == "message":
            sender = frame.get("sender_id")
            if isinstance(chat_id, str) and isinstance(sender, str):
                return self.until.pop((chat_id, sender), None) is not None
            return False
        if kind == "blocked" and isinstance(frame.get("data"), list):
            return self._drop(lambda _chat, user: user in frame["data"])
        if kind == "authenticated":
            return self._drop(lambda _chat, _user: True)
        return False

    def expire(self, now: float) -> bool:
        """Drop the indicators whose time is up; True when any was."""
        return self._drop(lambda chat, user: self.until[(chat, user)] <= now)

    def next_end(self) -> float | None:
        """When the next indicator ends by itself (None when nobody types)."""
        return min(self.until.values(), default=None)

    def typists(self) -> dict[str, list[str]]:
        """chat_id -> who is typing there, in the order they started."""
        chats: dict[str, list[str]] = {}
        for chat_id, user in self.until:
            chats.setdefault(chat_id, []).append(user)
        return chats

    def _drop(self, which: Callable[[str, str], bool]) -> bool:
        gone = [key for key in self.until if which(*key)]
        for key in gone:
            del self.until[key]
        return bool(gone)


def _names(users: list[str], most: int) -> str:
    """`bob`, `alice and bob`, `alice, bob and carol`, `alice, bob, carol and 2 others`."""
    if len(users) > most:
        rest = len(users) - most
        return f"{', '.join(users[:most])} and {_plural(rest, 'other')}"
    if len(users) == 1:
        return users[0]
    return f"{', '.join(users[:-1])} and {users[-1]}"


def typing_line(board: TypingBoard, context: Context) -> str:
    """`bob is typing… (chat 7)`; in a group `alice and bob are typing… ("Team")`; "" when
    nobody types. Several chats are joined with `; `."""
    parts = []
    for chat_id, users in board.typists().items():
        info = context.chats.get(chat_id)
        if info is not None and info.kind == "group" and info.title is not None:
            where = json.dumps(info.title, ensure_ascii=False)
        else:
            where = f"chat {chat_id}"
        verb = "is" if len(users) == 1 else "are"
        parts.append(f"{_names(users, MAX_NAMES_TYPING)} {verb} typing… ({where})")
    return "; ".join(parts)


MAX_PRESENCE_SHOWN: Final = 4  # users on the presence line; the rest are "+2"


def seen_at(last_seen: str, tz: tzinfo | None = None) -> datetime | None:
    """A `last_seen` timestamp (ISO 8601 UTC) in local time (or `tz`); None if it is not one."""
    try:
        when = datetime.fromisoformat(last_seen)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(tz)


def presence_text(presence: Presence, tz: tzinfo | None = None) -> str:
    """`online`, `last seen 2 Dec 18:04` (local time), or `offline` (never seen, or hidden)."""
    if presence.online:
        return "online"
    when = seen_at(presence.last_seen, tz) if presence.last_seen is not None else None
    if when is None:
        return "offline"
    return f"last seen {when.day} {when:%b %H:%M}"


def _by_presence(item: tuple[str, Presence]) -> tuple[int, float, str]:
    """Online first, then the most recently seen, then the never seen; then by user id."""
    user, presence = item
    when = seen_at(presence.last_seen) if presence.last_seen is not None else None
    rank = 0 if presence.online else 1 if when is not None else 2
    return rank, -when.timestamp() if when is not None else 0.0, user


def people_line(context: Context, now: datetime | None = None, tz: tzinfo | None = None) -> str:
    """Presence and blocks, as the window shows them under their templates:
    `● bob  ○ carol 18:04  ○ dave  +2   blocked: mallory` (● online, ○ offline with the
    time last seen, the day when it was not today)."""
    if not context.presence:
        text = "presence: none yet"
    else:
        today = (now or datetime.now(tz)).astimezone(tz).date()
        shown = []
        ranked = sorted(context.presence.items(), key=_by_presence)
        for user, presence in ranked[:MAX_PRESENCE_SHOWN]:
            if presence.online:
                shown.append(f"● {user}")
                continue
            when = seen_at(presence.last_seen, tz) if presence.last_seen is not None else None
            if when is None:
                shown.append(f"○ {user}")
            elif when.date() == today:
                shown.append(f"○ {user} {when:%H:%M}")
            else:
                shown.append(f"○ {user} {when.day} {when:%b}")
        if len(ranked) > MAX_PRESENCE_SHOWN:
            shown.append(f"+{len(ranked) - MAX_PRESENCE_SHOWN}")
        text = "  ".join(shown)
    if context.blocked is None:
        return text
    blocked = list(context.blocked)
    names = ", ".join(blocked[:MAX_PRESENCE_SHOWN]) or "nobody"
    more = f" +{len(blocked) - MAX_PRESENCE_SHOWN}" if len(blocked) > MAX_PRESENCE_SHOWN else ""
    return f"{text}   blocked: {names}{more}"


def _pick_users(
    candidates: Iterable[str | None], taken: Iterable[str | None], count: int
) -> list[str]:
    """The first `count` distinct users of `candidates` that are not `taken`."""
    chosen: list[str] = []
    skip = set(taken)
    for user in candidates:
        if user is not None and user not in skip and user not in chosen:
            chosen.append(user)
    return chosen[:count]


def frame_template(name: str, context: Context) -> dict[str, Any]:
    """A ready-to-send client frame: of type `name`, or the `CHAT_LIST`, `GROUP_MESSAGE` or
    `PRESENCE_OF` one; filled in from `context`.

    `mark_read` names the newest message seen in the last chat; `edit_message` and
    `delete_message` the last message this user sent (only the sender may change one).
    `send_message` goes to the last direct chat, the group ones to the last group: `create_group`
    offers the other person of the last direct chat and a made-up user as members,
    `add_members` the first of those not in the group yet, and `remove_member` the last other
    member when this user created the group (only the creator may remove someone else), else
    this user (leaving).
    `typing` is for the last chat (edit `active` to `false` to stop); `PRESENCE_OF` asks
    about the contacts (everyone this user shares a chat with), else a made-up user;
    `block_user` names the other person of the last direct chat unless already blocked (then
    the next contact or made-up user who is not), `unblock_user` that person when blocked, else
    the first one blocked. Neither ever names this user (the server refuses that).
    The tests check every template against `handler.protocol.decode`, the server's own decoder.
    """
    chat_id = context.chat_id or "CHAT_ID"
    peer = context.peer or "bob"
    message_id = context.message_id or "MESSAGE_ID"
    own_chat_id, own_message_id = context.own_message or (chat_id, "MESSAGE_ID")
    me = context.user_id
    group_id = context.group_id or "CHAT_ID"
    group = context.chats.get(group_id)
    members = group.participants if group is not None else ()
    others = [user for user in members if user != me]
    creator = group is not None and me is not None and group.created_by == me
    contacts = context.contacts()
    blocked = list(context.blocked or ())
    candidates = [context.peer, *contacts, *SAMPLE_USERS]
    to_block = _pick_users(candidates, [me, *blocked], 1) or [peer]
    if context.peer is not None and context.peer in blocked:
        to_unblock = context.peer
    else:
        to_unblock = (blocked or _pick_users(candidates, [me], 1) or [peer])[0]
    templates: dict[str, dict[str, Any]] = {
        "create_chat": {"type": "create_chat", "recipient_id": peer},
        "send_message": {
            "type": "send_message",
            "chat_id": context.direct_chat_id() or "CHAT_ID",
            "recipient_id": peer,
            "content": "Hello!",
            # A resend with the same id is stored once: safe to press Send twice.
            "client_message_id": uuid.uuid4().hex,
        },
        "mark_read": {"type": "mark_read", "chat_id": chat_id, "message_id": message_id},
        "edit_message": {
            "type": "edit_message",
            "chat_id": own_chat_id,
            "message_id": own_message_id,
            "content": "Hello! (edited)",
        },
        "delete_message": {
            "type": "delete_message",
            "chat_id": own_chat_id,
            "message_id": own_message_id,
        },
        "fetch_chats": {"type": "fetch_chats"},
        CHAT_LIST: {"type": "fetch_chats", "limit": 0},
        "fetch_messages": {"type": "fetch_messages", "chat_id": chat_id, "limit": 50},
        "ping": {"type": "ping"},
        "create_group": {
            "type": "create_group",
            "title": "Team",
            "member_ids": _pick_users([context.peer, *SAMPLE_USERS], [me], 2),
        },
        GROUP_MESSAGE: {
            "type": "send_message",
            "chat_id": group_id,
            "content": "Hello, everyone!",
            "client_message_id": uuid.uuid4().hex,
        },
        "add_members": {
            "type": "add_members",
            "chat_id": group_id,
            "member_ids": _pick_users([context.peer, *SAMPLE_USERS], [me, *members], 1),
        },
        "remove_member": {
            "type": "remove_member",
            "chat_id": group_id,
            "user_id": others[-1] if creator and others else (me or peer),
        },
        "typing": {"type": "typing", "chat_id": chat_id, "active": True},
        "fetch_presence": {"type": "fetch_presence"},
        PRESENCE_OF: {
            "type": "fetch_presence",
            "user_ids": _pick_users(contacts, [me], protocol.MAX_PRESENCE_IDS)
            or _pick_users([context.peer, *SAMPLE_USERS], [me], 1),
        },
        "block_user": {"type": "block_user", "user_id": to_block[0]},
        "unblock_user": {"type": "unblock_user", "user_id": to_unblock},
        "fetch_blocked": {"type": "fetch_blocked"},
    }
    return templates[name]


def check_frame(text: str) -> str | None:
    """What the server's decoder would object to in `text`, or None when it is a valid frame."""
    try:
        protocol.decode(text)
    except ProtocolError as error:
        where = f" ({error.field})" if error.field else ""
        return f"{error.code}{where}: {error.message}"
    return None


def shorten_tokens(value: Any) -> Any:
    """A copy of a frame with tokens cut to their start: the log is for reading, not for secrets."""
    if isinstance(value, dict):
        return {
            key: (
                f"{item[:12]}… ({len(item)} chars)"
                if key == "token" and isinstance(item, str) and len(item) > 16
                else shorten_tokens(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [shorten_tokens(item) for item in value]
    return value


def parse_frame(text: str) -> dict[str, Any] | None:
    """The frame as a dict, or None when the text is not a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def pretty(text: str) -> str:
    """Indented JSON when `text` is JSON, else the text unchanged."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return json.dumps(shorten_tokens(value), indent=2, ensure_ascii=False)


def _seq(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def message_summary(message: Mapping[str, Any]) -> str:
    """`seq 3, alice → bob`, and `edited` or `deleted` when the message is."""
    parts = []
    seq = _seq(message.get("seq"))
    if seq is not None:
        parts.append(f"seq {seq}")
    sender, recipient = message.get("sender_id"), message.get("recipient_id")
    if isinstance(sender, str):
        parts.append(f"{sender} → {recipient}" if isinstance(recipient, str) else sender)
    if message.get("deleted") is True:
        parts.append("deleted")
    elif message.get("edited_at"):
        parts.append("edited")
    return ", ".join(parts)


MAX_NAMES_SHOWN: Final = 6  # members named in a `chat_updated` header, the rest are "…"


def chat_summary(info: ChatInfo) -> str:
    """`group "Team", 3 members` ("" for a direct chat: its header says enough)."""
    if info.kind != "group":
        return ""
    title = json.dumps(info.title, ensure_ascii=False) if info.title is not None else "(untitled)"
    return f"group {title}, {_plural(len(info.participants), 'member')}"


def typing_summary(frame: Mapping[str, Any]) -> str:
    """`bob is typing in chat 7 (6 s)` or `bob stopped typing in chat 7`."""
    user, chat_id = frame.get("user_id"), frame.get("chat_id")
    if not isinstance(user, str):
        return ""
    where = f" in chat {chat_id}" if isinstance(chat_id, str) else ""
    if frame.get("active") is False:
        return f"{user} stopped typing{where}"
    expires = _seq(frame.get("expires_in_ms"))
    for_how_long = f" ({expires / 1000:g} s)" if expires is not None else ""
    return f"{user} is typing{where}{for_how_long}"


def frame_summary(frame: Mapping[str, Any]) -> str:
    """One line on what a server frame says, for the log's header line ("" when nothing)."""
    kind = frame.get("type")
    data = frame.get("data")
    if kind in ("message", "message_updated"):
        return message_summary(frame)
    if kind == "chat_updated":
        info = chat_info(data) if isinstance(data, Mapping) else None
        if info is None:
            return ""
        names = ", ".join(info.participants[:MAX_NAMES_SHOWN])
        more = ", …" if len(info.participants) > MAX_NAMES_SHOWN else ""
        about = chat_summary(info) or _plural(len(info.participants), "member")
        return f"{about}: {names}{more}" if names else about
    if kind == "receipt":
        user, seq = frame.get("user_id"), _seq(frame.get("seq"))
        upto = "" if seq is None else f" up to seq {seq}"
        if frame.get("kind") == "read":
            return f"{user} read{upto}"
        if frame.get("kind") == "delivered":
            return f"delivered to {user}{upto}"
        return ""
    if kind == "typing":
        return typing_summary(frame)
    if not isinstance(data, list):
        return ""
    if kind == "presence":
        entries = [entry for entry in map(presence_entry, data) if entry is not None]
        said = [f"{user} {presence_text(presence)}" for user, presence in entries[:5]]
        more = "; …" if len(entries) > 5 else ""
        return "; ".join(said) + more if said else "nobody"
    if kind == "blocked":
        users = [user for user in data if isinstance(user, str)]
        if not users:
            return "nobody"
        names = ", ".join(users[:MAX_NAMES_SHOWN])
        more = ", …" if len(users) > MAX_NAMES_SHOWN else ""
        return f"{_plural(len(users), 'user')}: {names}{more}"
    items = [item for item in data if isinstance(item, Mapping)]
    if kind in ("all_chats", "new_chats"):
        unread = [_seq(chat.get("unread_count")) for chat in items]
        counts = [count for count in unread if count is not None]
        text = _plural(len(data), "chat")
        if counts:
            text = f"{text}, {sum(counts)} unread"
        infos = [info for info in map(chat_info, items) if info is not None]
        groups = [chat_summary(info) for info in infos if info.kind == "group"]
        if groups:
            more = "; …" if len(groups) > 3 else ""
            text = f"{text}; {'; '.join(groups[:3])}{more}"
        return text
    if kind in ("all_messages", "new_messages"):
        seqs = [seq for seq in (_seq(item.get("seq")) for item in items) if seq is not None]
        text = _plural(len(data), "message")
        if not seqs:
            return text
        span = f"seq {seqs[0]}" if len(seqs) == 1 else f"seq {seqs[0]}..{seqs[-1]}"
        return f"{text}, {span}"
    if kind == "updated_messages":
        changes = [message_summary(item) for item in items[:5]]
        more = ", …" if len(items) > 5 else ""
        return f"{_plural(len(data), 'message')}: {'; '.join(changes)}{more}"
    return ""


@dataclass(frozen=True)
class LogEntry:
    """One line of the frame log: a frame in or out, or a note from the client itself."""

    at: datetime
    direction: str  # "in", "out" or "note"
    text: str

    @property
    def frame(self) -> dict[str, Any] | None:
        return parse_frame(self.text) if self.direction != "note" else None

    def header(self) -> str:
        arrow = {"in": "← in ", "out": "→ out", "note": "• note"}[self.direction]
        clock = f"{self.at:%H:%M:%S}.{self.at.microsecond // 1000:03d}"
        frame = self.frame
        kind = str(frame.get("type", "?")) if frame is not None else ""
        if self.direction == "in" and frame is not None:
            if frame.get("type") == "error":
                kind = f"error {frame.get('code', '')}".rstrip()
            else:
                summary = frame_summary(frame)
                kind = f"{kind}  {summary}" if summary else kind
        return f"{clock}  {arrow}  {kind}".rstrip()

    @property
    def tag(self) -> str:
        """The log's colour for the header: by direction, and by kind for what arrives."""
        frame = self.frame
        if frame is not None and frame.get("type") == "error":
            return "error"
        if self.direction != "in" or frame is None:
            return self.direction
        return HEADER_TAGS.get(str(frame.get("type")), "in")

    def body(self) -> str:
        return pretty(self.text) if self.direction != "note" else self.text


class SentHistory:
    """The frames sent so far, browsable like a shell history (older / newer)."""

    def __init__(self, limit: int = 100) -> None:
        self._items: collections.deque[str] = collections.deque(maxlen=limit)
        self._position = 0
        self._draft = ""

    def __len__(self) -> int:
        return len(self._items)

    def add(self, text: str) -> None:
        if not self._items or self._items[-1] != text:
            self._items.append(text)
        self._position = len(self._items)

    def older(self, current: str) -> str | None:
        """The previous sent frame; remembers `current` as a draft when leaving it."""
        if self._position == 0:
            return None
        if self._position == len(self._items):
            self._draft = current
        self._position -= 1
        return self._items[self._position]

    def newer(self) -> str | None:
        """The next sent frame, then the draft; None when already at the draft."""
        if self._position >= len(self._items):
            return None
        self._position += 1
        if self._position == len(self._items):
            return self._draft
        return self._items[self._position]


async def post_json(url: str, payload: Mapping[str, Any]) -> tuple[int, Any]:
    """POST a JSON body and return (status, parsed JSON or None), with h11 over a Trio stream.

    Ten lines of sans-IO HTTP keep the client to the libraries the server already uses.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    body = json.dumps(payload).encode()
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="POST",
        target=parts.path or "/",
        headers=[
            ("Host", parts.netloc),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ],
    )
    status, chunks = 0, []
    with trio.fail_after(HTTP_TIMEOUT_S):
        if parts.scheme == "https":
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(host, port)
        else:
            stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                connection.send(request)
                + connection.send(h11.Data(data=body))
                + connection.send(h11.EndOfMessage())
            )
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    try:
        return status, json.loads(b"".join(chunks))
    except ValueError:
        return status, None


async def fetch_dev_token(http_base: str, user_id: str) -> str:
    """A token from a handler with `auth.dev_tokens` on; raises `RuntimeError` saying why not."""
    status, body = await post_json(f"{http_base}/auth/dev-token", {"user_id": user_id})
    if status == 404:
        raise RuntimeError("this server does not hand out dev tokens (auth.dev_tokens is off)")
    if status != 200 or not isinstance(body, dict) or not isinstance(body.get("token"), str):
        detail = body.get("message") if isinstance(body, dict) else None
        raise RuntimeError(detail or f"dev token request failed with HTTP {status}")
    return str(body["token"])


# =============================================================================== the connection


class LinkListener(Protocol):
    """What a `Link` reports; the window implements it, tests can too."""

    def link_state(self, state: str, detail: str) -> None: ...

    def link_entry(self, entry: LogEntry) -> None: ...


class Link:
    """One logical connection to the handler that survives drops.

    `run()` connects and, while `auto_reconnect` is set, reconnects after a backoff whenever the
    socket closes, except after a 1008 (see `after_close`). Every (re)connect uses `token` as
    it is then: `use_token()` changes it for the next one. States reported: "connecting",
    "connected" (again when the sign-in changes: `sign_in`), "renewing" (getting a new token),
    "waiting" (backoff) and "disconnected" (with the close that made it stop, if any). Frames
    to send go through a bounded channel to the one writer task, so the person's frames and the
    automatic pings never write to the socket concurrently.
    """

    def __init__(self, listener: LinkListener, *, ping_interval: float = PING_INTERVAL_S) -> None:
        self._listener = listener
        self.ping_interval = ping_interval
        self.auto_ping = True
        self.auto_reconnect = True
        self.state = "disconnected"
        self.sign_in = SignIn()
        # What the next (re)connect binds with, and how to get a new one after a 1008.
        self.token = ""
        self.renew_token: Callable[[], Awaitable[str | None]] | None = None
        # A renewal was tried since the last binding or the last `use_token()`.
        self._renewed = False
        # The close that made `run()` give up on its token (a 1008), for the window to ask for
        # a new one; None while running and after any other end.
        self.refused: Closed | None = None
        self._detail = ""
        self._outgoing: trio.MemorySendChannel[str] | None = None

    def send(self, text: str) -> bool:
        """Queue a frame for the writer; False (with a note) when not connected or backed up."""
        if self._outgoing is None:
            self._note("not connected: the frame was not sent")
            return False
        try:
            text.encode()
        except UnicodeEncodeError:
            self._note("the text is not valid Unicode (a lone surrogate?): use a \\u escape")
            return False
        try:
            self._outgoing.send_nowait(text)
        except trio.WouldBlock:
            self._note("the send queue is full: the frame was not sent")
            return False
        return True

    def use_token(
        self, token: str, renew_token: Callable[[], Awaitable[str | None]] | None = None
    ) -> None:
        """Bind with `token` from the next (re)connect on, renewing it with `renew_token`.

        A connection that is open stays as it is: the server never rebinds a bound one.
        """
        self.token, self.renew_token, self._renewed = token, renew_token, False

    async def run(
        self,
        url: str,
        *,
        token: str = "",
        renew_token: Callable[[], Awaitable[str | None]] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stay connected to `url` with `token` until cancelled, or until it has to stop.

        It stops after a drop when `auto_reconnect` is off, and after a 1008 close (the token
        was refused or expired). `renew_token`, when given, is asked once for a new token after
        a 1008 instead (once more only after a connection bound); None from it means stop.
        A token given with `use_token()` meanwhile is the one every later connect uses.
        """
        self.use_token(token, renew_token)
        task_status.started()
        self.refused = None
        attempt = 0
        end = ""
        try:
            while True:
                self.sign_in = SignIn()
                self._set_state("connecting", url.split("?")[0])
                closed: Closed | None = None
                used = self.token
                try:
                    closed = await self._session(with_token(url, used))
                    attempt = 0  # it was up: the next drop starts the backoff afresh
                except (OSError, trio_websocket.HandshakeError) as error:
                    self._note(f"cannot connect: {describe(error)}")
                if self.sign_in.user_id is not None:
                    self._renewed = False  # that token worked: a later 1008 may renew it again
                if not self.auto_reconnect:
                    end = "" if closed is None else str(closed)
                    return
                renew = self.renew_token
                step = after_close(
                    closed,
                    can_renew=renew is not None,
                    renewed=self._renewed,
                    new_token=self.token != used,
                )
                if step is Step.RENEW and renew is not None:
                    self._renewed = True
                    self._set_state("renewing", f"{closed}: getting a new token")
                    new_token = await renew()
                    if new_token is not None:
                        self.token = new_token
                        continue
                    step = Step.STOP
                if step is Step.STOP:
                    assert closed is not None
                    self.refused = closed
                    end = str(closed)
                    self._note(f"not reconnecting: the server closed with {closed}")
                    return
                delay = backoff_delay(attempt)
                attempt += 1
                why = "" if closed is None else f"{closed}; "
                how = " with the new token" if self.token != used else ""
                self._set_state("waiting", f"{why}reconnecting{how} in {delay:.1f} s")
                await trio.sleep(delay)
        finally:
            self._set_state("disconnected", end)

    async def _session(self, url: str) -> Closed:
        async with trio_websocket.open_websocket_url(url, connect_timeout=10) as ws:
            send_channel, receive_channel = trio.open_memory_channel[str](OUTGOING_CAPACITY)
            self._outgoing = send_channel
            self._set_state("connected", url.split("?")[0])
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws, receive_channel)
                    nursery.start_soon(self._pinger)
                    closed = await self._reader(ws)
                    nursery.cancel_scope.cancel()  # the reader ended: so does everything else
            finally:
                self._outgoing = None
                send_channel.close()
        return closed

    async def _reader(self, ws: trio_websocket.WebSocketConnection) -> Closed:
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed as error:
                closed = close_of(error.reason, self.sign_in.problem)
                self._note(f"connection closed: {closed}")
                return closed
            text = message if isinstance(message, str) else message.decode("utf-8", "replace")
            frame = parse_frame(text)
            changed = frame is not None and self.sign_in.observe(frame)
            self._listener.link_entry(LogEntry(datetime.now(), "in", text))
            if changed:
                self._set_state(self.state, self._detail)

    async def _writer(
        self,
        ws: trio_websocket.WebSocketConnection,
        frames: trio.MemoryReceiveChannel[str],
    ) -> None:
        async with frames:
            async for text in frames:
                try:
                    await ws.send_message(text)
                except trio_websocket.ConnectionClosed:
                    return  # the reader sees the close and reports it
                self._listener.link_entry(LogEntry(datetime.now(), "out", text))

    async def _pinger(self) -> None:
        # The handler closes a connection that sends no data frame for 60 s; a ping every 25 s
        # keeps a quiet connection open.
        while True:
            await trio.sleep(self.ping_interval)
            if self.auto_ping and self._outgoing is not None:
                self.send(json.dumps({"type": "ping"}))

    def _set_state(self, state: str, detail: str) -> None:
        self.state, self._detail = state, detail
        self._listener.link_state(state, detail)

    def _note(self, text: str) -> None:
        self._listener.link_entry(LogEntry(datetime.now(), "note", text))


def close_of(reason: trio_websocket.CloseReason | None, auth_problem: str | None) -> Closed:
    """A trio-websocket close reason as a `Closed`; no reason at all means the TCP link broke."""
    if reason is None:
        return Closed(ABNORMAL_CLOSURE, "abnormal closure", auth_problem)
    text = reason.reason or str(reason.name).lower().replace("_", " ")
    return Closed(reason.code, text, auth_problem)


def describe(error: BaseException) -> str:
    """A one-line reason for a connection failure, for people rather than developers."""
    if isinstance(error, trio_websocket.ConnectionRejected):
        return f"the server refused the upgrade with HTTP {error.status_code}"
    return str(error) or type(error).__name__


# =============================================================================== the window


class TkHost:
    """Runs Trio as a guest inside Tk's event loop (Trio's "guest mode").

    Trio calls `run_sync_soon_threadsafe` from its I/O thread when it has work for the Tk thread.
    The callable is queued here and one Tcl `after 0` call, which tkinter hands to the Tk thread
    safely, runs it there: every Trio task step therefore happens on the Tk thread.
    """

    def __init__(self, root: tk.Tk) -> None:
        self._root = root
        self._queue: collections.deque[Callable[[], object]] = collections.deque()
        self._tcl_command = root.register(self._run_next)

    def _run_next(self) -> None:
        self._queue.popleft()()

    def run_sync_soon_threadsafe(self, fn: Callable[[], object]) -> None:
        self._queue.append(fn)
        self._root.call("after", 0, self._tcl_command)


class App:
    """The test client window. Tk callbacks never await: they hand work to Trio."""

    def __init__(
        self, root: tk.Tk, endpoints: Endpoints, *, user: str = "", token: str = ""
    ) -> None:
        self.root = root
        self.endpoints = endpoints
        self.link = Link(self)
        self.context = Context()
        self.typing = TypingBoard()
        self.history = SentHistory()
        self.entries: list[LogEntry] = []
        self.trio_outcome: outcome.Outcome[None] | None = None
        self._nursery: trio.Nursery | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._link_scope: trio.CancelScope | None = None
        self._closing: trio.Event | None = None
        # Set when a typing indicator starts, is renewed or ends: the task that ends them
        # when their time is up looks at the next deadline again.
        self._typing_changed: trio.Event | None = None
        # The last dev token this window fetched, and for whom: only that one is renewed by
        # itself when the server refuses it (a pasted token is the person's to replace).
        self._dev_token: tuple[str, str] | None = None
        self._build(user, token)

    # ------------------------------------------------------------------ layout

    def _build(self, user: str, token: str) -> None:
        root = self.root
        root.title("Chat handler test client")
        root.geometry("1040x760")
        root.minsize(720, 480)
        style = ttk.Style(root)
        if "clam" in style.theme_names():
            style.theme_use("clam")
        mono = tkfont.nametofont("TkFixedFont").copy()
        mono.configure(size=10)
        root.columnconfigure(0, weight=1)
        root.rowconfigure(4, weight=1)

        connection = ttk.Frame(root, padding=(8, 8, 8, 2))
        connection.grid(row=0, column=0, sticky="ew")
        connection.columnconfigure(1, weight=2)
        connection.columnconfigure(6, weight=3)
        self.url_var = tk.StringVar(value=self.endpoints.ws)
        self.user_var = tk.StringVar(value=user)
        self.token_var = tk.StringVar(value=token)
        ttk.Label(connection, text="Server").grid(row=0, column=0, padx=(0, 4))
        self.url_entry = ttk.Entry(connection, textvariable=self.url_var, width=28)
        self.url_entry.grid(row=0, column=1, sticky="ew")
        ttk.Label(connection, text="User").grid(row=0, column=2, padx=(10, 4))
        self.user_entry = ttk.Entry(connection, textvariable=self.user_var, width=12)
        self.user_entry.grid(row=0, column=3)
        self.dev_token_button = ttk.Button(
            connection, text="Get dev token", command=self.get_dev_token
        )
        self.dev_token_button.grid(row=0, column=4, padx=4)
        ttk.Label(connection, text="Token").grid(row=0, column=5, padx=(6, 4))
        self.token_entry = ttk.Entry(connection, textvariable=self.token_var, width=30)
        self.token_entry.grid(row=0, column=6, sticky="ew")
        self.connect_button = ttk.Button(connection, text="Connect", command=self.connect)
        self.connect_button.grid(row=0, column=7, padx=(8, 2))
        self.disconnect_button = ttk.Button(
            connection, text="Disconnect", command=self.disconnect, state="disabled"
        )
        self.disconnect_button.grid(row=0, column=8)

        options = ttk.Frame(root, padding=(8, 2))
        options.grid(row=1, column=0, sticky="ew")
        # A grid, its weight on the status: a long status (a close reason) is cut at the right
        # instead of pushing the options out of the window.
        options.columnconfigure(0, weight=1)
        self.state_label = tk.Label(options, text="● disconnected", fg=GREY, anchor="w")
        self.state_label.grid(row=0, column=0, sticky="ew")
        self.reconnect_var = tk.BooleanVar(value=True)
        self.ping_var = tk.BooleanVar(value=True)
        ttk.Checkbutton(
            options,
            text="Reconnect automatically",
            variable=self.reconnect_var,
            command=self._options_changed,
        ).grid(row=0, column=1, padx=(16, 0))
        ttk.Checkbutton(
            options,
            text=f"Ping every {PING_INTERVAL_S:.0f} s",
            variable=self.ping_var,
            command=self._options_changed,
        ).grid(row=0, column=2, padx=(8, 0))

        templates = ttk.Frame(root, padding=(8, 4))
        templates.grid(row=2, column=0, sticky="ew")
        templates.columnconfigure(1, weight=1)
        ttk.Label(templates, text="Template:").grid(row=0, column=0, padx=(0, 4), sticky="w")
        self.template_buttons: dict[str, ttk.Button] = {}
        rows: list[ttk.Frame] = []
        for row, names in enumerate(TEMPLATE_ROWS):
            buttons = ttk.Frame(templates)
            buttons.grid(row=row, column=1, sticky="ew", pady=(0 if row == 0 else 2, 0))
            rows.append(buttons)
            for name in names:
                button = ttk.Button(
                    buttons, text=name, command=functools.partial(self.fill_template, name)
                )
                button.pack(side="left", padx=2)
                self.template_buttons[name] = button
        # What the templates fill in, right of the buttons: the chat and messages on the
        # second row (the first is full), the group on the group row.
        self.context_label = ttk.Label(rows[1], text=context_line(self.context), foreground=GREY)
        self.context_label.pack(side="right", padx=(8, 0))
        self.group_label = ttk.Label(rows[2], text=group_line(self.context), foreground=GREY)
        self.group_label.pack(side="right", padx=(8, 0))
        # The people row is full: under it, who is typing (as a chat header shows it), and
        # the presence and block list the server reported.
        people = ttk.Frame(templates)
        people.grid(row=len(TEMPLATE_ROWS), column=1, sticky="ew", pady=(3, 0))
        italic = tkfont.nametofont("TkDefaultFont").copy()
        italic.configure(slant="italic")
        self.typing_label = ttk.Label(people, text="", foreground=ACCENT, font=italic)
        self.typing_label.pack(side="left", padx=(2, 0))
        self.people_label = ttk.Label(people, text=people_line(self.context), foreground=GREY)
        self.people_label.pack(side="right", padx=(8, 0))

        editor = ttk.Frame(root, padding=(8, 2))
        editor.grid(row=3, column=0, sticky="ew")
        editor.columnconfigure(0, weight=1)
        self.editor = tk.Text(editor, height=9, font=mono, undo=True, wrap="none")
        self.editor.grid(row=0, column=0, sticky="nsew")
        self.editor.bind("<Control-Return>", self._on_send_key)
        self.editor.bind("<Control-Up>", self._on_older_key)
        self.editor.bind("<Control-Down>", self._on_newer_key)
        side = ttk.Frame(editor, padding=(6, 0, 0, 0))
        side.grid(row=0, column=1, sticky="ns")
        self.send_button = ttk.Button(side, text="Send  (Ctrl+Enter)", command=self.send_editor)
        self.send_button.pack(fill="x")
        ttk.Button(side, text="Format JSON", command=self.format_editor).pack(fill="x", pady=4)
        ttk.Button(side, text="◀ Older  (Ctrl+↑)", command=self.history_older).pack(fill="x")
        ttk.Button(side, text="Newer ▶  (Ctrl+↓)", command=self.history_newer).pack(
            fill="x", pady=4
        )

        log = ttk.Frame(root, padding=(8, 4, 8, 8))
        log.grid(row=4, column=0, sticky="nsew")
        log.columnconfigure(0, weight=1)
        log.rowconfigure(1, weight=1)
        head = ttk.Frame(log)
        head.grid(row=0, column=0, sticky="ew")
        self.log_title = ttk.Label(head, text="Frames in and out (0)")
        self.log_title.pack(side="left")
        ttk.Button(head, text="Clear", command=self.clear_log).pack(side="right")
        self.log = scrolledtext.ScrolledText(log, font=mono, state="disabled", wrap="word")
        self.log.grid(row=1, column=0, sticky="nsew", pady=(4, 0))
        bold = (mono.actual("family"), 10, "bold")
        self.log.tag_configure("in", foreground="#1b7a43", font=bold)
        self.log.tag_configure("out", foreground="#2456c9", font=bold)
        self.log.tag_configure("note", foreground="#7a7f8a")
        self.log.tag_configure("error", foreground="#c62828", font=bold)
        self.log.tag_configure("receipt", foreground="#00838f", font=bold)
        self.log.tag_configure("update", foreground="#7b3fb5", font=bold)
        self.log.tag_configure("activity", foreground="#5b6b8c", font=bold)
        self.log.tag_configure("body", lmargin1=24, lmargin2=24)

        self.fill_template("ping")
        root.protocol("WM_DELETE_WINDOW", self.close)

    # ------------------------------------------------------------------ Trio in Tk

    def start(self, script: Callable[[App], Awaitable[None]] | None = None) -> None:
        """Start Trio as a guest of Tk's loop; `script` (for tests) runs as a Trio task."""
        host = TkHost(self.root)
        trio.lowlevel.start_guest_run(
            self._trio_main,
            script,
            run_sync_soon_threadsafe=host.run_sync_soon_threadsafe,
            done_callback=self._trio_done,
        )

    async def _trio_main(self, script: Callable[[App], Awaitable[None]] | None) -> None:
        self._closing = trio.Event()
        self._trio_token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._end_typing_in_time)
            if script is not None:
                nursery.start_soon(script, self)
            await self._closing.wait()
            nursery.cancel_scope.cancel()

    async def _end_typing_in_time(self) -> None:
        """Take each typing indicator off when its `expires_in_ms` has passed unrenewed."""
        while True:
            self._typing_changed = trio.Event()
            end = self.typing.next_end()
            with trio.move_on_at(math.inf if end is None else end):
                await self._typing_changed.wait()
            if self.typing.expire(trio.current_time()):
                self._show_typing()

    def _show_typing(self) -> None:
        self.typing_label.configure(text=typing_line(self.typing, self.context))

    def _trio_done(self, result: outcome.Outcome[None]) -> None:
        self.trio_outcome = result
        if isinstance(result, outcome.Error):
            traceback.print_exception(result.error)
        self.root.destroy()

    def _in_trio(self, fn: Callable[..., object], *args: object) -> None:
        """Run a sync function on Trio's side, from a Tk callback."""
        if self._trio_token is not None:
            self._trio_token.run_sync_soon(fn, *args)

    def _spawn(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Start a Trio task from a Tk callback."""
        if self._nursery is not None:
            self._in_trio(self._nursery.start_soon, async_fn, *args)

    def close(self) -> None:
        """Window closed: cancel everything in Trio; Trio's done callback destroys the window."""
        if self._closing is None:
            self.root.destroy()
        else:
            self._in_trio(self._closing.set)

    # ------------------------------------------------------------------ actions

    def get_dev_token(self) -> None:
        user = self.user_var.get().strip()
        if not user:
            self._add_entry(LogEntry(datetime.now(), "note", "type a user id first"))
            return
        self._spawn(self._new_dev_token, user)

    async def _new_dev_token(self, user: str) -> None:
        """Get dev token: the token field, and the link's next (re)connect, use the new one."""
        token = await self.load_dev_token(user)
        if token is None or self._link_scope is None:
            return  # not connected: Connect takes it from the token field
        self.link.use_token(token, self.renew_dev_token)
        bound = self.link.sign_in.user_id
        now = f"this connection stays signed in as {bound!r}" if bound else "not signed in now"
        self._add_entry(
            LogEntry(datetime.now(), "note", f"the next reconnect signs in with it ({now})")
        )

    async def load_dev_token(self, user: str) -> str | None:
        """Ask the server for a dev token for `user`, put it in the token field and return it."""
        try:
            http = resolve_endpoints(self.url_var.get()).http
            token = await fetch_dev_token(http, user)
        except (OSError, ValueError, RuntimeError, trio.TooSlowError, h11.ProtocolError) as error:
            self._add_entry(LogEntry(datetime.now(), "note", f"no dev token: {describe(error)}"))
            return None
        self._dev_token = (user, token)
        self.token_var.set(token)
        self._add_entry(LogEntry(datetime.now(), "note", f"got a dev token for {user!r}"))
        return token

    async def renew_dev_token(self) -> str | None:
        """The link's `renew_token` while it uses a dev token this window fetched."""
        if self._dev_token is None:
            return None
        user = self._dev_token[0]
        self._add_entry(
            LogEntry(
                datetime.now(), "note", f"the server refused the token: a new one for {user!r}"
            )
        )
        return await self.load_dev_token(user)

    def connect(self) -> None:
        try:
            ws = resolve_endpoints(self.url_var.get()).ws
        except ValueError as error:
            self._add_entry(LogEntry(datetime.now(), "note", str(error)))
            return
        token = self.token_var.get().strip()
        renew = self._dev_token is not None and self._dev_token[1] == token
        self.connect_button.configure(state="disabled")
        self.disconnect_button.configure(state="normal")
        self._options_changed()
        self._spawn(self._run_link, ws, token, self.renew_dev_token if renew else None)

    async def _run_link(
        self, url: str, token: str, renew: Callable[[], Awaitable[str | None]] | None
    ) -> None:
        with trio.CancelScope() as scope:
            self._link_scope = scope
            await self.link.run(url, token=token, renew_token=renew)
        self._link_scope = None
        self.connect_button.configure(state="normal")
        self.disconnect_button.configure(state="disabled")

    def disconnect(self) -> None:
        if self._link_scope is not None:
            self._in_trio(self._link_scope.cancel)

    def _options_changed(self) -> None:
        self.link.auto_reconnect = self.reconnect_var.get()
        self.link.auto_ping = self.ping_var.get()

    def fill_template(self, frame_type: str) -> None:
        text = json.dumps(frame_template(frame_type, self.context), indent=2, ensure_ascii=False)
        self._set_editor(text)

    def send_editor(self) -> None:
        text = self.editor.get("1.0", "end-1c").strip()
        if not text:
            return
        problem = check_frame(text)
        if problem is not None:
            # Sending invalid frames is part of testing a server: warn, then send anyway.
            self._add_entry(LogEntry(datetime.now(), "note", f"local check: {problem}"))
        # Sent exactly as typed: re-serializing would hide what was typed (escapes, key order,
        # duplicate keys), and those are what a test of the server's decoder is about.
        frame = parse_frame(text)
        self.history.add(text)
        if frame is not None:
            self.context.observe_sent(frame)
        self._in_trio(self.link.send, text)

    def _on_send_key(self, _event: tk.Event[tk.Text]) -> str:
        self.send_editor()
        return "break"

    def _on_older_key(self, _event: tk.Event[tk.Text]) -> str:
        self.history_older()
        return "break"

    def _on_newer_key(self, _event: tk.Event[tk.Text]) -> str:
        self.history_newer()
        return "break"

    def format_editor(self) -> None:
        text = self.editor.get("1.0", "end-1c")
        formatted = pretty(text)
        if formatted != text:
            self._set_editor(formatted)

    def history_older(self) -> None:
        text = self.history.older(self.editor.get("1.0", "end-1c"))
        if text is not None:
            self._set_editor(text)

    def history_newer(self) -> None:
        text = self.history.newer()
        if text is not None:
            self._set_editor(text)

    def clear_log(self) -> None:
        self.entries.clear()
        self.log.configure(state="normal")
        self.log.delete("1.0", "end")
        self.log.configure(state="disabled")
        self.log_title.configure(text="Frames in and out (0)")

    def _set_editor(self, text: str) -> None:
        self.editor.delete("1.0", "end")
        self.editor.insert("1.0", text)

    # ------------------------------------------------------------------ LinkListener

    def link_state(self, state: str, detail: str) -> None:
        text, colour = status_view(state, detail, self.link.sign_in)
        self.state_label.configure(text=f"● {text}", fg=colour)
        if state == "disconnected" and self.link.refused is not None:
            self._ask_for_token(self.link.refused)

    def _ask_for_token(self, closed: Closed) -> None:
        """The server refused the token (1008): say so, and put the cursor in the token field."""
        note = (
            f"{closed.reason or closed.code}: the same token would only be refused again, so "
            "paste a new token, or press Get dev token, then Connect"
        )
        self._add_entry(LogEntry(datetime.now(), "note", note))
        self.token_entry.focus_set()
        self.token_entry.select_range(0, "end")

    def link_entry(self, entry: LogEntry) -> None:
        frame = entry.frame
        if entry.direction != "in" or frame is None:
            self._add_entry(entry)
            return
        known = dict(self.context.chats)
        self.context.observe_received(frame)
        if self.typing.observe(frame, trio.current_time()):
            if self._typing_changed is not None:
                self._typing_changed.set()
            self._show_typing()
        elif frame.get("type") in ("new_chats", "all_chats", "chat_updated"):
            self._show_typing()  # a group's title may have come or changed
        self._add_entry(entry)
        if frame.get("type") == "chat_updated":
            # The removed user's copy: say why the group templates stopped offering it.
            for chat_id in known.keys() - self.context.chats.keys():
                title = known[chat_id].title
                name = f"{json.dumps(title, ensure_ascii=False)} ({chat_id})" if title else chat_id
                note = f"{self.context.user_id} is no longer a member of {name}: dropped it"
                self._add_entry(LogEntry(datetime.now(), "note", note))

    def _add_entry(self, entry: LogEntry) -> None:
        self.entries.append(entry)
        del self.entries[:-MAX_LOG_ENTRIES]
        at_end = self.log.yview()[1] >= 0.999
        self.log.configure(state="normal")
        self.log.insert("end", entry.header() + "\n", entry.tag)
        body_tags = ("body", "note") if entry.direction == "note" else ("body",)
        self.log.insert("end", entry.body() + "\n\n", body_tags)
        if int(self.log.index("end-1c").split(".")[0]) > MAX_LOG_ENTRIES * 12:
            self.log.delete("1.0", f"end-{MAX_LOG_ENTRIES * 10} lines")
        self.log.configure(state="disabled")
        if at_end:
            self.log.see("end")
        self.log_title.configure(text=f"Frames in and out ({len(self.entries)})")
        self.context_label.configure(text=context_line(self.context))
        self.group_label.configure(text=group_line(self.context))
        self.people_label.configure(text=people_line(self.context))


# =============================================================================== entry point


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "url",
        nargs="?",
        help="handler address (host:port, http://..., ws://.../ws); "
        "default: handler_url of --config",
    )
    parser.add_argument("--config", type=Path, default=Path("config.json"), help="config.json path")
    parser.add_argument("--user", default="", help="user id to fill in")
    parser.add_argument("--token", default="", help="a JWT to connect with")
    parser.add_argument("--connect", action="store_true", help="connect at start")
    return parser.parse_args(None if argv is None else list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        endpoints = resolve_endpoints(args.url, args.config)
    except ValueError as error:
        print(f"test_client: {error}", file=sys.stderr)
        return 2
    root = tk.Tk()
    app = App(root, endpoints, user=args.user, token=args.token)

    async def connect_at_start(app: App) -> None:
        if args.user and not args.token:
            await app.load_dev_token(args.user)
        app.connect()

    app.start(connect_at_start if args.connect else None)
    root.mainloop()
    return 1 if isinstance(app.trio_outcome, outcome.Error) else 0


if __name__ == "__main__":
    sys.exit(main())
