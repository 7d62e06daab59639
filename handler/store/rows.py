"""Rows to records, for both SQL backends: the column lists their queries select, and how
such a row becomes a `Chat` or a `Message`.

Both schemas name and order these columns alike (`store/schema.py`); only how text is stored
differs (PostgreSQL keeps it as UTF-8 BYTEA), which the caller's `text` decoder covers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from handler.protocol import GROUP, Chat, Message
from handler.timefmt import format_ms

_CHAT_FIELDS: Final = ("id", "user_a", "user_b", "created_by", "created_at_ms", "kind", "title")
_MESSAGE_FIELDS: Final = (
    "id",
    "chat_id",
    "sender_id",
    "recipient_id",
    "content",
    "created_at_ms",
    "client_message_id",
    "seq",
    "version",
    "edited_at_ms",
    "deleted",
)


def chat_columns(alias: str = "") -> str:
    """The columns `chat_of` reads, qualified by `alias` for joins."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + name for name in _CHAT_FIELDS)


def message_columns(alias: str = "") -> str:
    """The columns `message_of` reads, qualified by `alias` for joins."""
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + name for name in _MESSAGE_FIELDS)


CHAT_COLUMNS: Final = chat_columns()
MESSAGE_COLUMNS: Final = message_columns()
CHAT_WIDTH: Final = len(_CHAT_FIELDS)
MESSAGE_WIDTH: Final = len(_MESSAGE_FIELDS)


def int_id(value: str) -> int | None:
    """Ids are decimal integers (rowids, BIGINTs); anything else cannot name a row."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def chat_of(row: Sequence[Any], members: Iterable[str] = ()) -> Chat:
    """A `CHAT_COLUMNS` row as a `Chat`; a group's participants are its `members`."""
    kind = row[5]
    participants = tuple(sorted(members)) if kind == GROUP else (row[1], row[2])
    return Chat(str(row[0]), participants, row[3], format_ms(row[4]), kind, row[6])


def is_group_row(row: Sequence[Any]) -> bool:
    """Whether a `CHAT_COLUMNS` row is a group's (its participants are `members` rows)."""
    return bool(row[5] == GROUP)


def as_text(value: Any) -> str:
    """A text column as the driver returns it (SQLite: already `str`)."""
    return str(value)


def message_of(row: Sequence[Any], text: Callable[[Any], str] = as_text) -> Message:
    """A `MESSAGE_COLUMNS` row as a `Message`; `text` decodes the content and the client's id."""
    edited = row[9]
    return Message(
        str(row[0]),
        str(row[1]),
        row[2],
        row[3] or None,  # '': a group message, which has no recipient
        text(row[4]),
        format_ms(row[5]),
        None if row[6] is None else text(row[6]),
        row[7],
        row[8],
        None if edited is None else format_ms(edited),
        bool(row[10]),
    )


__all__ = [
    "CHAT_COLUMNS",
    "CHAT_WIDTH",
    "MESSAGE_COLUMNS",
    "MESSAGE_WIDTH",
    "as_text",
    "chat_columns",
    "chat_of",
    "int_id",
    "is_group_row",
    "message_columns",
    "message_of",
]
