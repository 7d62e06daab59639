"""What travels to a connection's socket, as plain records (pure: no trio, no I/O).

`Outgoing` is one encoded frame; `Receipt` says what it delivers to whom once the client's TCP
stack has taken it (PROTOCOL "Delivery"). The session machine, the hub and the transport all
pass these around; none of them needs the others' code to read them.
"""

from __future__ import annotations

from typing import Final

import attrs


@attrs.frozen
class SeqMark:
    """What one frame delivers of one chat: its messages from `first` (None: `seq` alone) up
    to `seq` (the message `message_id`), and every change up to `version`. 0 leaves that mark
    as it is. The delivered mark only moves where the frame continues it: other members'
    messages between the mark and `first` must have been delivered before."""

    chat_id: str
    seq: int = 0
    message_id: str | None = None
    version: int = 0
    first: int | None = None


@attrs.frozen
class Receipt:
    """What counts as delivered to `user_id` once the frame carrying it is written: the
    chats themselves (`chat_ids`) and each chat's marks."""

    user_id: str
    chat_ids: tuple[str, ...] = ()
    marks: tuple[SeqMark, ...] = ()


@attrs.frozen
class Outgoing:
    """An encoded frame on its way to the socket."""

    text: str
    frame_type: str
    receipt: Receipt | None = None
    published_at: float | None = None  # monotonic clock, for publish-to-deliver latency
    # For de-duplicating fan-out against a binding's backlog: the chat, its `version` (0 for
    # the chat's creation, None for what no backlog carries, like receipts) and the message.
    message_id: str | None = None
    chat_id: str | None = None
    version: int | None = None


def utf8_length(text: str) -> int:
    """Bytes of `text` in UTF-8, without encoding it in the common ASCII case."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


TYPING: Final = "typing"  # frame_type of a typing signal: dropped first when behind (`Connection`)
PING: Final = "ping"  # frame_type of the keep-alive item: a WebSocket ping, not a text frame
PING_ITEM: Final = Outgoing("", PING)
# frame_type of the item after which the writer closes the connection (`close_when_written`).
CLOSE_AFTER: Final = "close"
CLOSE_ITEM: Final = Outgoing("", CLOSE_AFTER)
# frame_type of the item after which the writer stops and hands the socket back to the reader
# (a binding that failed after the writer started).
RETIRE: Final = "retire"
RETIRE_ITEM: Final = Outgoing("", RETIRE)
# frame_type of an item that writes nothing but carries a receipt: it counts as delivered once
# everything queued before it reached the client.
MARK_ONLY: Final = "mark"
