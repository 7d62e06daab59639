"""The Tkinter test client: its pure helpers, its Trio connection against a real handler, and the
window itself under Xvfb."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
import trio_websocket
from clients_support import (
    REPO_ROOT,
    HandlerProcess,
    Xvfb,
    ensure_debian_packages,
    ensure_tkinter,
    load_test_client,
    save_screenshot,
)
from support import wait_until

from handler import protocol
from handler.config import Config, parse_config
from handler.server import serve

# Without Tk the client cannot even be imported (it is the window's toolkit): skip, saying how
# to get it, unless it can be installed here (Debian's own Python and python3-tk).
_no_tk = ensure_tkinter()
if _no_tk is not None:
    pytest.skip(_no_tk, allow_module_level=True)
import tkinter as tk  # noqa: E402

tc = load_test_client()

# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("target", "http", "ws"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000", "ws://127.0.0.1:9000/ws"),
        ("[::]:9000", "http://[::1]:9000", "ws://[::1]:9000/ws"),
        ("https://chat.example:443", "https://chat.example:443", "wss://chat.example:443/ws"),
        ("ws://localhost:8080/ws", "http://localhost:8080", "ws://localhost:8080/ws"),
        ("wss://chat.example/gateway", "https://chat.example", "wss://chat.example/gateway"),
        ("http://localhost:8080/", "http://localhost:8080", "ws://localhost:8080/ws"),
    ],
)
def test_resolve_endpoints_from_target(target: str, http: str, ws: str) -> None:
    assert tc.resolve_endpoints(target) == tc.Endpoints(http=http, ws=ws)


def test_resolve_endpoints_from_config(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"handler_url": "0.0.0.0:8123"}))
    assert tc.resolve_endpoints(None, config).ws == "ws://127.0.0.1:8123/ws"
    # Without a config the client still starts, on the handler's default address.
    assert tc.resolve_endpoints(None, tmp_path / "missing.json").ws == "ws://127.0.0.1:8080/ws"


@pytest.mark.parametrize("target", ["ftp://host:21", "http://", "::::"])
def test_resolve_endpoints_rejects_nonsense(target: str) -> None:
    with pytest.raises(ValueError, match="not a handler address"):
        tc.resolve_endpoints(target)


def test_with_token_encodes_the_query() -> None:
    assert tc.with_token("ws://h:1/ws", "") == "ws://h:1/ws"
    assert tc.with_token("ws://h:1/ws", "a.b+c") == "ws://h:1/ws?token=a.b%2Bc"
    assert tc.with_token("ws://h:1/ws?x=1", "t") == "ws://h:1/ws?x=1&token=t"


def test_backoff_grows_is_capped_and_keeps_a_floor() -> None:
    assert tc.backoff_delay(0, rand=lambda: 0.0) == pytest.approx(0.25)
    assert tc.backoff_delay(0, rand=lambda: 1.0) == pytest.approx(0.5)
    assert tc.backoff_delay(3, rand=lambda: 0.0) == pytest.approx(2.0)
    assert tc.backoff_delay(30, rand=lambda: 1.0) == pytest.approx(tc.BACKOFF_MAX_S)
    assert tc.backoff_delay(30, rand=lambda: 0.0) == pytest.approx(tc.BACKOFF_MAX_S / 2)


def test_templates_cover_every_client_frame_and_pass_the_servers_decoder() -> None:
    assert sorted(tc.TEMPLATE_TYPES) == sorted(protocol.CLIENT_FRAME_TYPES)
    context = tc.Context(user_id="alice", chat_id="c1", peer="bob")
    for frame_type in tc.TEMPLATE_TYPES:
        frame = tc.frame_template(frame_type, context)
        decoded = protocol.decode(json.dumps(frame))
        assert decoded.type == frame_type
    # The group variant of send_message: no recipient_id at all.
    group_message = tc.frame_template(tc.GROUP_MESSAGE, context)
    assert "recipient_id" not in group_message
    decoded = protocol.decode(json.dumps(group_message))
    assert (decoded.type, decoded.recipient_id) == ("send_message", None)
    # fetch_presence both ways: for the contacts (no user_ids), and naming users.
    everyone = protocol.decode(json.dumps(tc.frame_template("fetch_presence", context)))
    assert everyone.user_ids is None
    decoded = protocol.decode(json.dumps(tc.frame_template(tc.PRESENCE_OF, context)))
    assert (decoded.type, decoded.user_ids) == ("fetch_presence", ("bob",))


def test_send_message_template_uses_the_context_and_a_fresh_client_message_id() -> None:
    context = tc.Context(user_id="alice", chat_id="c9", peer="bob")
    first = tc.frame_template("send_message", context)
    second = tc.frame_template("send_message", context)
    assert (first["chat_id"], first["recipient_id"]) == ("c9", "bob")
    assert first["client_message_id"] != second["client_message_id"]


def test_every_template_has_a_button_and_the_chat_list_asks_for_chats_only() -> None:
    buttons = [name for row in tc.TEMPLATE_ROWS for name in row]
    assert sorted(buttons) == sorted(
        [*tc.TEMPLATE_TYPES, tc.CHAT_LIST, tc.GROUP_MESSAGE, tc.PRESENCE_OF]
    )
    frame = tc.frame_template(tc.CHAT_LIST, tc.Context())
    decoded = protocol.decode(json.dumps(frame))
    assert (decoded.type, decoded.limit) == ("fetch_chats", 0)


def test_receipt_edit_and_delete_templates_name_the_messages_seen() -> None:
    context = tc.Context()
    # Before any message: placeholders the server's decoder accepts (and the server refuses).
    assert tc.frame_template("mark_read", context)["message_id"] == "MESSAGE_ID"
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    context.observe_received({"type": "message", **message("c1", "bob", "alice", "m1")})
    assert tc.frame_template("mark_read", context) == {
        "type": "mark_read",
        "chat_id": "c1",
        "message_id": "m1",
    }
    # Only the sender may edit or delete: those templates name this user's own last message.
    assert tc.frame_template("edit_message", context)["message_id"] == "MESSAGE_ID"
    context.observe_received({"type": "message", **message("c1", "alice", "bob", "m2")})
    context.observe_received({"type": "message", **message("c2", "dave", "alice", "m3")})
    assert tc.frame_template("mark_read", context)["message_id"] == "m3"
    edit = tc.frame_template("edit_message", context)
    assert (edit["chat_id"], edit["message_id"]) == ("c1", "m2")
    assert edit["content"]
    delete = tc.frame_template("delete_message", context)
    assert delete == {"type": "delete_message", "chat_id": "c1", "message_id": "m2"}
    for name in ("mark_read", "edit_message", "delete_message"):
        assert protocol.decode(json.dumps(tc.frame_template(name, context))).type == name
    # An edit of it changes nothing; once deleted there is nothing of ours left to edit.
    edited = {**message("c1", "alice", "bob", "m2"), "edited_at": "2024-01-01T00:00:00.000Z"}
    context.observe_received({"type": "message_updated", **edited})
    assert context.own_message == ("c1", "m2")
    tombstone = {**message("c1", "alice", "bob", "m2"), "content": "", "deleted": True}
    context.observe_received({"type": "message_updated", **tombstone})
    assert tc.frame_template("delete_message", context)["message_id"] == "MESSAGE_ID"
    assert context.message_id == "m3"  # changes to older messages do not move the chat on


def test_context_takes_the_last_message_of_a_chat_object() -> None:
    context = tc.Context(user_id="alice")
    last = {**message("c5", "alice", "gina", "m9"), "seq": 4}
    chats = [{**chat("c5", "alice", "gina"), "last_message": last, "unread_count": 0}]
    context.observe_received({"type": "all_chats", "data": chats})
    assert (context.chat_id, context.message_id, context.own_message) == ("c5", "m9", ("c5", "m9"))
    # A new chat has no messages yet: the message seen before was of another chat.
    fresh = {**chat("c6", "alice", "hugo"), "last_message": None}
    context.observe_received({"type": "new_chats", "data": [fresh]})
    assert (context.chat_id, context.message_id) == ("c6", None)
    assert tc.context_line(context) == "last chat: c6  with: hugo  yours: m9 (chat c5)"
    # Signed in as someone else: that message is not theirs to edit.
    context.observe_received({"type": "authenticated", "user_id": "bob"})
    assert context.own_message is None
    assert tc.context_line(tc.Context()) == "last chat: none yet  with: ?"


def chat(chat_id: str, *users: str) -> dict[str, Any]:
    return {"chat_id": chat_id, "participants": sorted(users), "created_by": users[0]}


def message(chat_id: str, sender: str, recipient: str, message_id: str = "") -> dict[str, Any]:
    frame = {"chat_id": chat_id, "sender_id": sender, "recipient_id": recipient, "content": "x"}
    return {**frame, "message_id": message_id} if message_id else frame


def test_context_follows_the_conversation() -> None:
    context = tc.Context()
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    context.observe_sent({"type": "create_chat", "recipient_id": "carol"})
    assert (context.user_id, context.peer) == ("alice", "carol")
    context.observe_received({"type": "new_chats", "data": [chat("c1", "alice", "bob")]})
    assert (context.chat_id, context.peer) == ("c1", "bob")
    context.observe_received({"type": "message", **message("c2", "dave", "alice")})
    assert (context.chat_id, context.peer) == ("c2", "dave")
    context.observe_received({"type": "message", **message("c3", "alice", "erin")})
    assert (context.chat_id, context.peer) == ("c3", "erin")
    context.observe_received(
        {"type": "new_messages", "chat_id": "c4", "data": [message("c4", "frank", "alice")]}
    )
    assert (context.chat_id, context.peer) == ("c4", "frank")
    # all_chats lists the most recently active chat first.
    all_chats = [chat("c5", "alice", "gina"), chat("c1", "alice", "bob")]
    context.observe_received({"type": "all_chats", "data": all_chats})
    assert (context.chat_id, context.peer) == ("c5", "gina")


def group(chat_id: str, title: str, creator: str, *members: str) -> dict[str, Any]:
    """A group's chat object (version 2 fields that matter here)."""
    return {
        "chat_id": chat_id,
        "kind": "group",
        "title": title,
        "participants": sorted([creator, *members]),
        "created_by": creator,
        "last_message": None,
        "unread_count": 0,
    }


def decoded(name: str, context: Any) -> Any:
    """The template `name` as the server's decoder reads it."""
    return protocol.decode(json.dumps(tc.frame_template(name, context)))


def test_group_templates_before_any_group_are_valid_placeholders() -> None:
    context = tc.Context(user_id="alice")
    create = decoded("create_group", context)
    assert (create.title, create.member_ids) == ("Team", ("bob", "carol"))
    assert decoded("add_members", context).chat_id == "CHAT_ID"
    # Not the creator of a group it does not know: leaving is what anyone may do.
    assert decoded("remove_member", context).user_id == "alice"
    assert decoded(tc.GROUP_MESSAGE, context).chat_id == "CHAT_ID"
    # The creator is never offered as a member of their own group.
    assert decoded("create_group", tc.Context(user_id="bob")).member_ids == ("carol", "dave")
    with_peer = tc.Context(user_id="alice", peer="zoe")
    assert decoded("create_group", with_peer).member_ids == ("zoe", "bob")


def test_group_templates_follow_the_group_and_its_members() -> None:
    context = tc.Context()
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    context.observe_received({"type": "new_chats", "data": [chat("d1", "alice", "bob")]})
    context.observe_received(
        {"type": "new_chats", "data": [group("g1", "Team", "alice", "bob", "carol")]}
    )
    assert (context.chat_id, context.group_id, context.peer) == ("g1", "g1", "bob")
    assert context.chats["g1"] == tc.ChatInfo("group", "Team", ("alice", "bob", "carol"), "alice")
    assert tc.context_line(context) == "last chat: g1  with: bob"
    assert tc.group_line(context) == 'group: g1 "Team", 3 members'
    send = tc.frame_template(tc.GROUP_MESSAGE, context)
    assert (send["chat_id"], "recipient_id" in send) == ("g1", False)
    assert (
        send["client_message_id"]
        != tc.frame_template(tc.GROUP_MESSAGE, context)["client_message_id"]
    )
    # The direct send_message still goes to the direct chat, never to the group.
    direct = tc.frame_template("send_message", context)
    assert (direct["chat_id"], direct["recipient_id"]) == ("d1", "bob")
    add = decoded("add_members", context)
    assert (add.chat_id, add.member_ids) == ("g1", ("dave",))  # the first one not in it yet
    remove = decoded("remove_member", context)
    assert (remove.chat_id, remove.user_id) == ("g1", "carol")  # the creator removes others
    assert decoded("mark_read", context).chat_id == "g1"
    assert decoded("fetch_messages", context).chat_id == "g1"

    # dave joined: the chat object of the change replaces what was known.
    added = group("g1", "Team", "alice", "bob", "carol", "dave")
    context.observe_received({"type": "chat_updated", "data": added, "request_id": 1})
    assert context.chats["g1"].participants == ("alice", "bob", "carol", "dave")
    assert decoded("add_members", context).member_ids == ("erin",)
    assert decoded("remove_member", context).user_id == "dave"

    # In a group someone else created, remove_member is leaving it.
    context.observe_received({"type": "new_chats", "data": [group("g2", "Club", "bob", "alice")]})
    assert context.group_id == "g2"
    assert decoded("remove_member", context).user_id == "alice"


def test_group_messages_move_the_group_but_not_the_peer() -> None:
    context = tc.Context(user_id="alice", chat_id="d1", peer="bob")
    assert tc.group_line(context) == "group: none yet"
    group_message = {"chat_id": "g7", "sender_id": "carol", "content": "hi", "message_id": "m1"}
    context.observe_received({"type": "message", **group_message})
    assert (context.chat_id, context.group_id, context.peer) == ("g7", "g7", "bob")
    assert tc.group_line(context) == "group: g7"  # its chat object was not seen
    assert tc.frame_template("mark_read", context)["message_id"] == "m1"
    assert tc.frame_template(tc.GROUP_MESSAGE, context)["chat_id"] == "g7"


def test_context_drops_a_group_it_is_no_longer_in() -> None:
    context = tc.Context()
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    team = group("g1", "Team", "bob", "alice", "carol")
    context.observe_received({"type": "new_chats", "data": [chat("d1", "alice", "bob"), team]})
    context.observe_received({"type": "message", **message("d1", "bob", "alice", "m1")})
    context.observe_received(
        {"type": "message", "chat_id": "g1", "sender_id": "alice", "message_id": "m2"}
    )
    assert (context.chat_id, context.own_message) == ("g1", ("g1", "m2"))
    # The removed user's copy of chat_updated lists the members without them.
    removed = group("g1", "Team", "bob", "carol")
    context.observe_received({"type": "chat_updated", "data": removed})
    assert "g1" not in context.chats
    assert (context.chat_id, context.group_id, context.own_message) == (None, None, None)
    assert tc.frame_template(tc.GROUP_MESSAGE, context)["chat_id"] == "CHAT_ID"
    # The direct chat with the other person is still there for send_message.
    assert tc.frame_template("send_message", context)["chat_id"] == "d1"
    assert context.peer == "bob"
    # all_chats is every chat of the user: one it no longer lists is gone too.
    context.observe_received({"type": "new_chats", "data": [group("g2", "Club", "bob", "alice")]})
    context.observe_received({"type": "all_chats", "data": [chat("d1", "alice", "bob")]})
    assert (list(context.chats), context.group_id, context.chat_id) == (["d1"], None, "d1")
    # Signed in as someone else: the chats were the other user's.
    context.observe_received({"type": "authenticated", "user_id": "bob"})
    assert context.chats == {}


def test_people_templates_before_anything_are_valid_placeholders() -> None:
    context = tc.Context(user_id="alice")
    assert tc.frame_template("typing", context) == {
        "type": "typing",
        "chat_id": "CHAT_ID",
        "active": True,
    }
    assert decoded("typing", context).active is True
    assert tc.frame_template("fetch_presence", context) == {"type": "fetch_presence"}
    assert decoded(tc.PRESENCE_OF, context).user_ids == ("bob",)
    assert decoded("block_user", context).user_id == "bob"
    assert decoded("unblock_user", context).user_id == "bob"
    assert tc.frame_template("fetch_blocked", context) == {"type": "fetch_blocked"}
    # Never this user: the server refuses blocking yourself.
    bob = tc.Context(user_id="bob")
    assert decoded("block_user", bob).user_id == "carol"
    assert decoded("unblock_user", bob).user_id == "carol"
    assert decoded(tc.PRESENCE_OF, bob).user_ids == ("carol",)


def test_people_templates_follow_the_chats_and_the_block_list() -> None:
    context = tc.Context()
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    context.observe_received({"type": "new_chats", "data": [chat("d1", "alice", "bob")]})
    team = group("g1", "Team", "carol", "alice", "dave", "bob")
    context.observe_received({"type": "new_chats", "data": [team]})
    assert context.contacts() == ["bob", "carol", "dave"]  # the other person first
    assert decoded("typing", context).chat_id == "g1"  # the last chat
    assert decoded(tc.PRESENCE_OF, context).user_ids == ("bob", "carol", "dave")
    assert decoded("block_user", context).user_id == "bob"
    context.observe_received({"type": "blocked", "data": ["bob"], "request_id": 1})
    assert context.blocked == ("bob",)
    # bob is blocked: unblock names him, block the next contact who is not blocked.
    assert decoded("unblock_user", context).user_id == "bob"
    assert decoded("block_user", context).user_id == "carol"
    context.observe_received({"type": "blocked", "data": ["mallory", "zed"]})
    assert decoded("unblock_user", context).user_id == "mallory"
    assert decoded("block_user", context).user_id == "bob"
    context.observe_received({"type": "blocked", "data": []})
    assert context.blocked == ()
    assert decoded("unblock_user", context).user_id == "bob"
    # Only chats this user is in make contacts: a group left is not asked about.
    context.observe_received({"type": "chat_updated", "data": group("g1", "Team", "carol", "bob")})
    assert decoded(tc.PRESENCE_OF, context).user_ids == ("bob",)


def test_context_keeps_the_presence_and_the_block_list_it_was_told() -> None:
    context = tc.Context(user_id="alice")
    reply = [
        {"user_id": "bob", "online": True, "last_seen": None},
        {"user_id": "carol", "online": False, "last_seen": "2026-12-02T18:00:00.123Z"},
        {"user_id": "dave", "online": False, "last_seen": None},
        {"online": True},
        "junk",
    ]
    context.observe_received({"type": "presence", "data": reply, "request_id": 1})
    assert context.presence == {
        "bob": tc.Presence(online=True),
        "carol": tc.Presence(online=False, last_seen="2026-12-02T18:00:00.123Z"),
        "dave": tc.Presence(online=False),
    }
    # A live frame changes its one entry only.
    live = {"user_id": "bob", "online": False, "last_seen": "2026-12-02T18:05:00.000Z"}
    context.observe_received({"type": "presence", "data": [live]})
    assert context.presence["bob"] == tc.Presence(False, "2026-12-02T18:05:00.000Z")
    assert len(context.presence) == 3
    context.observe_received({"type": "blocked", "data": ["mallory"]})
    context.observe_received({"type": "blocked", "data": ["bob", 7]})  # junk: kept as it was
    assert context.blocked == ("mallory",)
    # The same user signing in again keeps it; someone else starts afresh.
    context.observe_received({"type": "authenticated", "user_id": "alice"})
    assert (len(context.presence), context.blocked) == (3, ("mallory",))
    context.observe_received({"type": "authenticated", "user_id": "bob"})
    assert (context.presence, context.blocked) == ({}, None)


def typing(chat_id: str, user_id: str, active: bool = True, **more: Any) -> dict[str, Any]:
    """A `typing` frame as the server sends it."""
    frame = {"type": "typing", "chat_id": chat_id, "user_id": user_id, "active": active}
    return {**frame, "expires_in_ms": 6000, **more}


def test_typing_board_ends_indicators_on_time_on_stop_and_on_a_message() -> None:
    board = tc.TypingBoard()
    assert board.next_end() is None
    assert board.observe(typing("c1", "bob"), now=100.0)
    assert board.typists() == {"c1": ["bob"]}
    assert board.next_end() == pytest.approx(106.0)
    # A renewal moves the end: 6 s from the last one.
    assert board.observe(typing("c1", "bob"), now=103.0)
    assert not board.expire(now=108.9)
    assert board.expire(now=109.0)
    assert (board.typists(), board.next_end()) == ({}, None)
    # active: false ends it at once; a stop for nobody typing changes nothing.
    board.observe(typing("c1", "bob"), now=0.0)
    assert board.observe(typing("c1", "bob", active=False), now=1.0)
    assert not board.observe(typing("c1", "bob", active=False), now=1.0)
    # A message from the typist in that chat ends it; one elsewhere or from another does not.
    board.observe(typing("c1", "bob"), now=0.0)
    board.observe(typing("g1", "bob"), now=0.0)
    assert not board.observe({"type": "message", **message("c1", "alice", "bob", "m1")}, now=1)
    assert board.observe({"type": "message", **message("c1", "bob", "alice", "m2")}, now=1.0)
    assert board.typists() == {"g1": ["bob"]}
    # The server's expires_in_ms is what counts; without one, its documented 6 s.
    board.observe(typing("g1", "carol", expires_in_ms=250), now=10.0)
    board.observe({"type": "typing", "chat_id": "g1", "user_id": "dave"}, now=10.0)
    assert board.next_end() == pytest.approx(6.0)
    board.expire(now=6.0)
    assert board.next_end() == pytest.approx(10.25)
    board.expire(now=10.25)
    assert board.until == {("g1", "dave"): pytest.approx(16.0)}


def test_typing_board_forgets_whom_this_user_blocks_and_a_new_binding() -> None:
    board = tc.TypingBoard()
    for user in ("bob", "carol"):
        board.observe(typing("g1", user), now=0.0)
    assert board.observe({"type": "blocked", "data": ["bob", "mallory"]}, now=1.0)
    assert board.typists() == {"g1": ["carol"]}
    assert not board.observe({"type": "blocked", "data": ["mallory"]}, now=1.0)
    assert board.observe({"type": "authenticated", "user_id": "alice"}, now=2.0)
    assert board.typists() == {}


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "typing", "chat_id": 7, "user_id": "bob"},
        {"type": "typing", "chat_id": "c1"},
        {"type": "message", "chat_id": "c1"},
        {"type": "blocked", "data": "bob"},
        {"type": "presence", "data": [{"user_id": "bob"}]},
    ],
)
def test_typing_board_ignores_frames_it_cannot_use(frame: dict[str, Any]) -> None:
    board = tc.TypingBoard()
    board.observe(typing("c1", "bob"), now=0.0)
    assert not board.observe(frame, now=1.0)
    assert board.typists() == {"c1": ["bob"]}


def test_typing_line_names_the_typists_of_each_chat() -> None:
    context = tc.Context(user_id="alice")
    context.observe_received(
        {
            "type": "new_chats",
            "data": [chat("d1", "alice", "bob"), group("g1", "Team", "a", "alice")],
        }
    )
    board = tc.TypingBoard()
    assert tc.typing_line(board, context) == ""
    board.observe(typing("d1", "bob"), now=0.0)
    assert tc.typing_line(board, context) == "bob is typing… (chat d1)"
    for user in ("carol", "dave"):
        board.observe(typing("g1", user), now=0.0)
    assert tc.typing_line(board, context) == (
        'bob is typing… (chat d1); carol and dave are typing… ("Team")'
    )
    board.observe(typing("d1", "bob", active=False), now=0.0)
    for user in ("erin", "frank", "gina"):
        board.observe(typing("g1", user), now=0.0)
    assert tc.typing_line(board, context) == ('carol, dave, erin and 2 others are typing… ("Team")')
    # A group whose chat object was not seen is named by its id.
    board.observe(typing("g9", "hugo"), now=0.0)
    board.observe(typing("g9", "ivan"), now=0.0)
    board.observe(typing("g9", "jane"), now=0.0)
    assert tc.typing_line(board, context).endswith("; hugo, ivan and jane are typing… (chat g9)")


def test_presence_reads_online_last_seen_or_offline() -> None:
    assert tc.presence_text(tc.Presence(online=True)) == "online"
    assert tc.presence_text(tc.Presence(online=False)) == "offline"
    seen = tc.Presence(online=False, last_seen="2026-12-02T18:04:59.123Z")
    assert tc.presence_text(seen, UTC) == "last seen 2 Dec 18:04"
    assert tc.presence_text(seen, timezone(timedelta(hours=9))) == "last seen 3 Dec 03:04"
    assert tc.presence_text(tc.Presence(False, "yesterday-ish")) == "offline"


def test_people_line_shows_presence_compactly_and_the_block_list() -> None:
    context = tc.Context(user_id="alice")
    assert tc.people_line(context) == "presence: none yet"
    now = datetime(2026, 12, 2, 20, 0, tzinfo=UTC)
    entries = [
        {"user_id": "carol", "online": False, "last_seen": "2026-12-01T09:30:00.000Z"},
        {"user_id": "dave", "online": False, "last_seen": None},
        {"user_id": "erin", "online": False, "last_seen": "2026-12-02T18:04:00.000Z"},
        {"user_id": "bob", "online": True, "last_seen": None},
    ]
    context.observe_received({"type": "presence", "data": entries})
    # Online first, then the most recently seen (the time today, else the day), then the rest.
    assert tc.people_line(context, now, UTC) == "● bob  ○ erin 18:04  ○ carol 1 Dec  ○ dave"
    context.observe_received(
        {"type": "presence", "data": [{"user_id": "zoe", "online": True, "last_seen": None}]}
    )
    assert tc.people_line(context, now, UTC) == "● bob  ● zoe  ○ erin 18:04  ○ carol 1 Dec  +1"
    context.observe_received({"type": "blocked", "data": []})
    assert tc.people_line(context, now, UTC).endswith("  +1   blocked: nobody")
    context.observe_received({"type": "blocked", "data": ["a", "b", "c", "d", "e", "f"]})
    assert tc.people_line(tc.Context(blocked=("mallory",))) == (
        "presence: none yet   blocked: mallory"
    )
    assert tc.people_line(context, now, UTC).endswith("   blocked: a, b, c, d +2")


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "new_chats", "data": []},
        {"type": "new_chats", "data": ["junk"]},
        {"type": "all_chats", "data": "junk"},
        {"type": "new_messages", "data": [None]},
        {"type": "message", "chat_id": 7},
        {"type": "authenticated", "user_id": None},
        {"type": "something_new"},
        {"type": "chat_updated", "data": "junk"},
        {"type": "chat_updated", "data": {"chat_id": "c1"}},
        {"type": "chat_updated", "data": {"chat_id": 7, "participants": []}},
        {"type": "presence", "data": "junk"},
        {"type": "presence", "data": [{"user_id": 7, "online": True}, None]},
        {"type": "blocked", "data": "bob"},
        {"type": "blocked", "data": [None]},
        {"type": "typing", "chat_id": "c9", "user_id": "dave", "active": True},
    ],
)
def test_context_ignores_frames_it_cannot_use(frame: dict[str, Any]) -> None:
    context = tc.Context(user_id="alice", chat_id="c1", peer="bob")
    context.observe_received(frame)
    assert (context.user_id, context.chat_id, context.peer) == ("alice", "c1", "bob")
    assert (context.presence, context.blocked) == ({}, None)


def test_check_frame_reports_what_the_server_would() -> None:
    assert tc.check_frame('{"type": "ping"}') is None
    assert tc.check_frame("{nope") == "bad_json: the frame is not valid JSON"
    problem = tc.check_frame('{"type": "send_message", "chat_id": "c", "recipient_id": "b"}')
    assert problem is not None
    assert problem.startswith("bad_request (content):")


def test_pretty_indents_json_and_shortens_tokens() -> None:
    token = "eyJhbGciOiJIUzI1NiJ9." + "x" * 40
    text = json.dumps({"type": "ping", "token": token, "nested": [{"token": "short"}]})
    shown = tc.pretty(text)
    assert '\n  "type": "ping"' in shown
    assert token not in shown
    assert f"eyJhbGciOiJI… ({len(token)} chars)" in shown
    assert '"token": "short"' in shown
    assert tc.pretty("not json") == "not json"


def test_log_entry_headers() -> None:
    at = datetime(2024, 1, 2, 3, 4, 5, 678_000)
    out = tc.LogEntry(at, "out", '{"type": "ping"}')
    assert out.header() == "03:04:05.678  → out  ping"
    error = tc.LogEntry(at, "in", '{"type": "error", "code": "not_found", "message": "m"}')
    assert error.header() == "03:04:05.678  ← in   error not_found"
    note = tc.LogEntry(at, "note", "hello")
    assert (note.header(), note.body(), note.frame) == ("03:04:05.678  • note", "hello", None)
    assert tc.LogEntry(at, "in", "[1, 2]").frame is None


@pytest.mark.parametrize(
    ("frame", "header"),
    [
        (
            {"type": "message", "seq": 3, **message("c1", "alice", "bob", "m3")},
            "message  seq 3, alice → bob",
        ),
        (
            {"type": "message_updated", "seq": 2, "edited_at": "t", **message("c", "a", "b")},
            "message_updated  seq 2, a → b, edited",
        ),
        (
            {"type": "message_updated", "seq": 2, "deleted": True, **message("c", "a", "b")},
            "message_updated  seq 2, a → b, deleted",
        ),
        (
            {"type": "receipt", "user_id": "bob", "kind": "read", "seq": 4, "chat_id": "c"},
            "receipt  bob read up to seq 4",
        ),
        (
            {"type": "receipt", "user_id": "bob", "kind": "delivered", "seq": 5},
            "receipt  delivered to bob up to seq 5",
        ),
        ({"type": "receipt", "user_id": "bob", "kind": "later"}, "receipt"),
        (
            {
                "type": "updated_messages",
                "chat_id": "c",
                "data": [
                    {"seq": 1, "edited_at": "t", **message("c", "a", "b")},
                    {"seq": 2, "deleted": True, **message("c", "a", "b")},
                ],
            },
            "updated_messages  2 messages: seq 1, a → b, edited; seq 2, a → b, deleted",
        ),
        (
            {
                "type": "all_chats",
                "data": [{**chat("c1", "a", "b"), "unread_count": 2}, chat("c2", "a", "c")],
            },
            "all_chats  2 chats, 2 unread",
        ),
        ({"type": "new_chats", "data": [chat("c1", "a", "b")]}, "new_chats  1 chat"),
        (
            {"type": "new_chats", "data": [group("g1", "Team", "a", "b", "c")]},
            'new_chats  1 chat, 0 unread; group "Team", 3 members',
        ),
        (
            {
                "type": "all_chats",
                "data": [
                    chat("c1", "a", "b"),
                    *(group(f"g{n}", f"G{n}", "a", "b") for n in range(4)),
                ],
            },
            'all_chats  5 chats, 0 unread; group "G0", 2 members; group "G1", 2 members;'
            ' group "G2", 2 members; …',
        ),
        (
            {"type": "chat_updated", "data": group("g1", "Team", "a", "b", "c"), "request_id": 1},
            'chat_updated  group "Team", 3 members: a, b, c',
        ),
        (
            {"type": "chat_updated", "data": group("g1", "Crowd", "a", *"bcdefgh")},
            'chat_updated  group "Crowd", 8 members: a, b, c, d, e, f, …',
        ),
        ({"type": "chat_updated", "data": "junk"}, "chat_updated"),
        (
            {"type": "message", "seq": 2, "chat_id": "g1", "sender_id": "bob", "content": "x"},
            "message  seq 2, bob",
        ),
        (
            {"type": "new_messages", "data": [{"seq": 4}, {"seq": 5}, {"seq": 6}]},
            "new_messages  3 messages, seq 4..6",
        ),
        ({"type": "all_messages", "data": [{"seq": 1}]}, "all_messages  1 message, seq 1"),
        ({"type": "all_messages", "data": []}, "all_messages  0 messages"),
        (typing("c7", "bob"), "typing  bob is typing in chat c7 (6 s)"),
        (typing("c7", "bob", expires_in_ms=2500), "typing  bob is typing in chat c7 (2.5 s)"),
        (typing("c7", "bob", active=False), "typing  bob stopped typing in chat c7"),
        ({"type": "typing", "user_id": "bob"}, "typing  bob is typing"),
        ({"type": "typing"}, "typing"),
        (
            {
                "type": "presence",
                "data": [
                    {"user_id": "bob", "online": True, "last_seen": None},
                    {"user_id": "dave", "online": False, "last_seen": None},
                ],
                "request_id": 3,
            },
            "presence  bob online; dave offline",
        ),
        (
            {
                "type": "presence",
                "data": [{"user_id": f"u{n}", "online": True} for n in range(7)],
            },
            "presence  u0 online; u1 online; u2 online; u3 online; u4 online; …",
        ),
        ({"type": "presence", "data": []}, "presence  nobody"),
        ({"type": "blocked", "data": ["bob", "mallory"]}, "blocked  2 users: bob, mallory"),
        ({"type": "blocked", "data": []}, "blocked  nobody"),
        (
            {"type": "blocked", "data": [f"u{n}" for n in range(7)]},
            "blocked  7 users: u0, u1, u2, u3, u4, u5, …",
        ),
        # Version 1 frames (no seq, no counts) and frames the client does not know.
        ({"type": "message", **message("c1", "alice", "bob")}, "message  alice → bob"),
        ({"type": "all_chats", "data": "junk"}, "all_chats"),
        ({"type": "pong"}, "pong"),
        ({"type": "something_new", "seq": 1}, "something_new"),
    ],
)
def test_log_headers_say_what_the_frame_says(frame: dict[str, Any], header: str) -> None:
    entry = tc.LogEntry(datetime(2024, 1, 2, 3, 4, 5), "in", json.dumps(frame))
    assert entry.header() == f"03:04:05.000  ← in   {header}"


def test_log_colours_receipts_and_changes_apart() -> None:
    at = datetime(2024, 1, 2)
    tags = {
        text: tc.LogEntry(at, direction, text).tag
        for direction, text in [
            ("in", '{"type": "receipt"}'),
            ("in", '{"type": "message_updated"}'),
            ("in", '{"type": "updated_messages"}'),
            ("in", '{"type": "chat_updated"}'),
            ("in", '{"type": "blocked"}'),
            ("in", '{"type": "typing"}'),
            ("in", '{"type": "presence"}'),
            ("in", '{"type": "message"}'),
            ("in", '{"type": "error"}'),
            ("out", '{"type": "mark_read"}'),
            ("note", "hello"),
        ]
    }
    assert list(tags.values()) == [
        "receipt",
        "update",
        "update",
        "update",
        "update",
        "activity",
        "activity",
        "in",
        "error",
        "out",
        "note",
    ]


def test_history_browses_like_a_shell() -> None:
    history = tc.SentHistory(limit=3)
    assert history.older("draft") is None
    for text in ("a", "b", "b", "c"):
        history.add(text)
    assert len(history) == 3  # the repeated "b" is kept once
    assert history.newer() is None
    assert history.older("draft") == "c"
    assert history.older("c") == "b"
    assert history.older("b") == "a"
    assert history.older("a") is None
    assert history.newer() == "b"
    assert history.newer() == "c"
    assert history.newer() == "draft"
    assert history.newer() is None
    history.add("d")
    assert history.older("") == "d"
    assert history.older("d") == "c"  # "a" fell off: the history is bounded


RECONNECT, RENEW, STOP = tc.Step.RECONNECT, tc.Step.RENEW, tc.Step.STOP


@pytest.mark.parametrize(
    ("code", "can_renew", "renewed", "step"),
    [
        (None, False, False, RECONNECT),  # the connection never opened (refused, timed out)
        (1001, False, False, RECONNECT),  # server going away (shutdown, restart)
        (1006, False, False, RECONNECT),  # dropped without a close frame
        (1011, False, False, RECONNECT),  # server error
        (1013, False, False, RECONNECT),  # try again later (send queue full, missed events)
        (1000, False, False, RECONNECT),
        (1009, False, False, RECONNECT),
        (1013, True, True, RECONNECT),
        (1008, False, False, STOP),  # the same token would be refused again: no loop
        (1008, True, False, RENEW),  # a dev token the client fetched itself: one new one
        (1008, True, True, STOP),  # ...and only once
    ],
)
def test_after_close_stops_on_1008_and_reconnects_otherwise(
    code: int | None, can_renew: bool, renewed: bool, step: Any
) -> None:
    closed = None if code is None else tc.Closed(code, "why")
    assert tc.after_close(closed, can_renew=can_renew, renewed=renewed) is step


@pytest.mark.parametrize("code", [None, 1001, 1008])
def test_after_close_reconnects_when_a_new_token_came_meanwhile(code: int | None) -> None:
    # The refusal was of the old token: the new one gets its own try, renewal or not.
    closed = None if code is None else tc.Closed(code, "why")
    for can_renew, renewed in [(False, False), (True, False), (True, True)]:
        step = tc.after_close(closed, can_renew=can_renew, renewed=renewed, new_token=True)
        assert step is RECONNECT


def test_closed_reads_as_code_reason_and_token_problem() -> None:
    assert str(tc.Closed(1001, "server shutting down")) == "1001 server shutting down"
    refused = tc.Closed(1008, "not authenticated in time", "invalid token: InvalidSignatureError")
    assert str(refused) == ("1008 not authenticated in time (invalid token: InvalidSignatureError)")
    assert str(tc.close_of(None, None)) == "1006 abnormal closure"


def test_sign_in_follows_binding_and_refusal() -> None:
    sign_in = tc.SignIn()
    assert not sign_in.observe({"type": "pong"})
    assert sign_in.observe({"type": "error", "code": "unauthorized", "message": "invalid token"})
    assert (sign_in.user_id, sign_in.problem) == (None, "invalid token")
    assert sign_in.observe({"type": "authenticated", "user_id": "alice"})
    assert (sign_in.user_id, sign_in.problem) == ("alice", None)
    # Bound: a frame with a bad token is refused, but the connection stays signed in.
    assert not sign_in.observe({"type": "error", "code": "unauthorized", "message": "expired"})
    assert sign_in.problem is None


@pytest.mark.parametrize(
    ("state", "detail", "sign_in", "text", "colour"),
    [
        ("connected", "ws://h/ws", tc.SignIn("alice"), "connected as alice", tc.GREEN),
        ("connected", "ws://h/ws", tc.SignIn(), "connected, not signed in", tc.AMBER),
        (
            "connected",
            "ws://h/ws",
            tc.SignIn(problem="invalid token: InvalidSignatureError"),
            "connected, not signed in: invalid token: InvalidSignatureError",
            tc.RED,
        ),
        (
            "disconnected",
            "1008 not authenticated in time (invalid token)",
            tc.SignIn(),
            "disconnected: 1008 not authenticated in time (invalid token)",
            tc.RED,
        ),
        ("disconnected", "", tc.SignIn("alice"), "disconnected", tc.GREY),
        (
            "waiting",
            "1001 bye; reconnecting in 0.3 s",
            tc.SignIn(),
            "waiting: 1001 bye; reconnecting in 0.3 s",
            tc.RED,
        ),
        ("connecting", "ws://h/ws", tc.SignIn(), "connecting: ws://h/ws", tc.AMBER),
        ("renewing", "", tc.SignIn(), "renewing", tc.AMBER),
    ],
)
def test_status_is_green_only_when_signed_in(
    state: str, detail: str, sign_in: Any, text: str, colour: str
) -> None:
    assert tc.status_view(state, detail, sign_in) == (text, colour)


# ----------------------------------------------------------------------------- Trio, real server


SECRET = "tk-client-tests-secret-0123456789"
AUTH_TIMEOUT_S = 0.3  # how long the servers below keep an unbound connection before 1008


def server_config(tmp_path: Path, *, dev_tokens: bool = True) -> Config:
    return parse_config(
        {
            "handler_url": "127.0.0.1:0",
            "storage": {"path": str(tmp_path / "chat.db")},
            "auth": {"jwt_secret": SECRET, "dev_tokens": dev_tokens},
            "limits": {"auth_timeout_s": AUTH_TIMEOUT_S},
        },
        base_dir=tmp_path,
    )


def foreign_token(user_id: str) -> str:
    """A well-formed token signed with another secret, like one from before a secret rotation."""
    return jwt.encode({"sub": user_id}, "some-other-secret-0123456789abcdef", algorithm="HS256")


@pytest.fixture
async def server_url(tmp_path: Path) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, server_config(tmp_path))
        yield urls[0]
        nursery.cancel_scope.cancel()


class Recorder:
    """A `LinkListener` that keeps what it is told and lets a test wait for it."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.details: list[str] = []
        self.entries: list[tc.LogEntry] = []
        self._changed = trio.Event()

    def link_state(self, state: str, detail: str) -> None:
        self.states.append(state)
        self.details.append(detail)
        self._wake()

    def link_entry(self, entry: tc.LogEntry) -> None:
        self.entries.append(entry)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def received(self, frame_type: str) -> list[dict[str, Any]]:
        return [
            entry.frame
            for entry in self.entries
            if entry.direction == "in" and entry.frame and entry.frame.get("type") == frame_type
        ]

    async def wait_for(self, predicate: Callable[[], object]) -> None:
        await wait_until(predicate, 10, changed=lambda: self._changed.wait())


async def test_fetch_dev_token_from_a_real_server(server_url: str) -> None:
    token = await tc.fetch_dev_token(server_url, "alice")
    assert token.count(".") == 2
    with pytest.raises(RuntimeError, match=r"user_id must be 1\.\.128 characters"):
        await tc.fetch_dev_token(server_url, "")


async def test_fetch_dev_token_says_when_the_server_has_none(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, server_config(tmp_path, dev_tokens=False))
        with pytest.raises(RuntimeError, match="does not hand out dev tokens"):
            await tc.fetch_dev_token(urls[0], "alice")
        nursery.cancel_scope.cancel()


async def test_link_binds_sends_and_receives(server_url: str) -> None:
    token = await tc.fetch_dev_token(server_url, "alice")
    ws_url = tc.with_token(tc.resolve_endpoints(server_url).ws, token)
    recorder = Recorder()
    link = tc.Link(recorder, ping_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run, ws_url)
        await recorder.wait_for(lambda: recorder.received("authenticated"))
        assert link.send(json.dumps({"type": "create_chat", "recipient_id": "bob"}))
        await recorder.wait_for(lambda: recorder.received("new_chats"))
        # The automatic pings go through the same writer as the person's frames.
        await recorder.wait_for(lambda: recorder.received("pong"))
        # Text that cannot be UTF-8 is refused here instead of breaking the writer; the same
        # surrogate as a JSON escape is sent as typed, and the server answers bad_request.
        assert not link.send('{"type": "create_chat", "recipient_id": "\ud800"}')
        assert "lone surrogate" in recorder.entries[-1].text
        assert link.send('{"type": "create_chat", "recipient_id": "\\ud800"}')
        await recorder.wait_for(lambda: recorder.received("error"))
        nursery.cancel_scope.cancel()
    assert recorder.received("error")[0]["code"] == "bad_request"
    assert recorder.received("authenticated")[0]["user_id"] == "alice"
    assert recorder.received("new_chats")[0]["data"][0]["participants"] == ["alice", "bob"]
    assert recorder.states[:2] == ["connecting", "connected"]
    assert recorder.states[-1] == "disconnected"


async def test_link_refuses_to_send_while_disconnected() -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    assert not link.send('{"type": "ping"}')
    assert recorder.entries[-1].text == "not connected: the frame was not sent"


async def test_link_reconnects_after_a_refused_connection(autojump_clock: trio.abc.Clock) -> None:
    # Port 1 on loopback refuses at once; the link backs off and tries again.
    recorder = Recorder()
    link = tc.Link(recorder)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run, "ws://127.0.0.1:1/ws")
        await recorder.wait_for(lambda: recorder.states.count("connecting") >= 3)
        nursery.cancel_scope.cancel()
    assert recorder.states[:3] == ["connecting", "waiting", "connecting"]
    assert "cannot connect" in recorder.entries[0].text


async def test_link_without_auto_reconnect_stops_after_one_try() -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    link.auto_reconnect = False
    with trio.fail_after(10):
        await link.run("ws://127.0.0.1:1/ws")
    assert recorder.states == ["connecting", "disconnected"]


async def test_link_stops_on_1008_instead_of_reconnecting_with_a_refused_token(
    server_url: str,
) -> None:
    # The server keeps the connection open, unbound, with `unauthorized`, then closes it with
    # 1008. Reconnecting with the same token would loop forever: the link stops by itself.
    recorder = Recorder()
    link = tc.Link(recorder)
    ws_url = tc.resolve_endpoints(server_url).ws
    with trio.fail_after(10):
        await link.run(ws_url, token=foreign_token("alice"))
    assert recorder.states.count("connecting") == 1
    assert recorder.states[-1] == "disconnected"
    assert link.refused is not None
    assert link.refused.code == 1008
    assert str(link.refused) == (
        "1008 not authenticated in time (invalid token: InvalidSignatureError)"
    )
    assert recorder.details[-1] == str(link.refused)
    assert recorder.received("error")[0]["code"] == "unauthorized"
    assert "not reconnecting: the server closed with 1008" in recorder.entries[-1].text


async def test_link_renews_a_refused_token_once_and_binds(server_url: str) -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    renewals: list[str] = []

    async def renew() -> str | None:
        renewals.append("alice")
        return await tc.fetch_dev_token(server_url, "alice")

    ws_url = tc.resolve_endpoints(server_url).ws
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(link.run, ws_url, token=foreign_token("alice"), renew_token=renew)
        )
        await recorder.wait_for(lambda: link.sign_in.user_id == "alice")
        nursery.cancel_scope.cancel()
    assert renewals == ["alice"]
    assert recorder.states[:4] == ["connecting", "connected", "connected", "renewing"]
    assert recorder.states.count("connecting") == 2
    assert link.refused is None


async def test_link_renews_only_once_when_the_new_token_is_refused_too(server_url: str) -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    renewals: list[str] = []

    async def renew() -> str | None:
        renewals.append("alice")
        return foreign_token("alice")

    ws_url = tc.resolve_endpoints(server_url).ws
    with trio.fail_after(10):
        await link.run(ws_url, token=foreign_token("alice"), renew_token=renew)
    assert renewals == ["alice"]
    assert recorder.states.count("connecting") == 2
    assert link.refused is not None
    assert link.refused.code == 1008


def accept_key(request: bytes) -> str:
    key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", request)
    assert key is not None
    digest = hashlib.sha1(key[1] + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest).decode()


async def closing_server(code: int, nursery: trio.Nursery) -> str:
    """A WebSocket server that accepts and at once ends the connection with `code` (1006: the
    TCP connection is dropped with no close frame); returns its URL."""
    if code == 1006:

        async def drop(stream: trio.SocketStream) -> None:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive_some(4096)
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n"
                + f"Sec-WebSocket-Accept: {accept_key(request)}\r\n\r\n".encode()
            )
            await stream.aclose()

        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, drop, 0, host="127.0.0.1")
        )
        return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/ws"

    async def close(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.aclose(code, f"closing with {code}")

    server = await nursery.start(
        functools.partial(trio_websocket.serve_websocket, close, "127.0.0.1", 0, ssl_context=None)
    )
    return f"ws://127.0.0.1:{server.port}/ws"


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1013])
async def test_link_reconnects_with_backoff_after_a_transient_close(code: int) -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    async with trio.open_nursery() as nursery:
        url = await closing_server(code, nursery)
        nursery.start_soon(link.run, url)
        await recorder.wait_for(lambda: recorder.states.count("connecting") >= 3)
        nursery.cancel_scope.cancel()
    assert recorder.states[:4] == ["connecting", "connected", "waiting", "connecting"]
    waiting = recorder.details[recorder.states.index("waiting")]
    assert waiting.startswith(f"{code} ")
    assert "; reconnecting in " in waiting
    assert link.refused is None


async def test_link_stops_on_a_1008_close_of_a_bound_connection_too() -> None:
    # Token expired, idle, too many connections: 1008 from any state stops the link.
    recorder = Recorder()
    link = tc.Link(recorder)
    async with trio.open_nursery() as nursery:
        url = await closing_server(1008, nursery)
        with trio.fail_after(10):
            await link.run(url, token="any")
        nursery.cancel_scope.cancel()
    assert recorder.states == ["connecting", "connected", "disconnected"]
    assert link.refused == tc.Closed(1008, "closing with 1008")


@pytest.mark.parametrize("code", [1001, 1008])
async def test_link_reconnects_with_the_token_given_while_it_was_connected(code: int) -> None:
    # A new token (Get dev token while connected) is the one the next connect binds with, also
    # after a 1008, which refused the old one and says nothing about the new one.
    paths: list[str] = []
    gate = trio.Event()

    async def close(request: trio_websocket.WebSocketRequest) -> None:
        paths.append(request.path)
        ws = await request.accept()
        await gate.wait()
        await ws.aclose(code, f"closing with {code}")

    recorder = Recorder()
    link = tc.Link(recorder)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket, close, "127.0.0.1", 0, ssl_context=None
            )
        )
        url = f"ws://127.0.0.1:{server.port}/ws"
        nursery.start_soon(functools.partial(link.run, url, token="old"))
        await recorder.wait_for(lambda: "connected" in recorder.states)
        link.use_token("new")
        gate.set()
        await recorder.wait_for(lambda: len(paths) >= 2)
        nursery.cancel_scope.cancel()
    assert paths[:2] == ["/ws?token=old", "/ws?token=new"]
    assert "renewing" not in recorder.states
    assert any("reconnecting with the new token in" in detail for detail in recorder.details)
    assert link.refused is None


async def test_link_binds_with_a_new_token_after_the_old_one_was_refused(server_url: str) -> None:
    recorder = Recorder()
    link = tc.Link(recorder)
    renewals: list[str] = []

    async def renew() -> str | None:
        renewals.append("alice")
        return None

    ws_url = tc.resolve_endpoints(server_url).ws
    good = await tc.fetch_dev_token(server_url, "alice")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(link.run, ws_url, token=foreign_token("alice"), renew_token=renew)
        )
        await recorder.wait_for(lambda: recorder.received("error"))
        assert link.sign_in.problem is not None  # refused: red, and 1008 follows
        link.use_token(good)
        await recorder.wait_for(lambda: link.sign_in.user_id == "alice")
        nursery.cancel_scope.cancel()
    assert renewals == []  # the new token was used, not a renewal of the refused one
    assert recorder.states.count("connecting") == 2
    assert link.refused is None


# ----------------------------------------------------------------------------- the window


WINDOW = (1040, 760)


@pytest.fixture(scope="session")
def xvfb() -> Iterator[Xvfb]:
    reason = ensure_debian_packages("Xvfb", "xvfb", "xauth")
    if reason is not None:
        pytest.skip(reason)
    display = Xvfb(*WINDOW)
    display.start()
    yield display
    display.stop()


@pytest.fixture
def handler_process(tmp_path: Path) -> Iterator[HandlerProcess]:
    # A short auth timeout: a refused token gets its 1008 in half a second, not ten.
    server = HandlerProcess(tmp_path, extra={"limits": {"auth_timeout_s": 0.5}})
    server.start()
    yield server
    server.stop()


def open_window(xvfb: Xvfb, url: str, *, user: str = "", token: str = "") -> tc.App:
    root = tk.Tk(screenName=xvfb.display)
    root.geometry(f"{WINDOW[0]}x{WINDOW[1]}+0+0")
    return tc.App(root, tc.resolve_endpoints(url), user=user, token=token)


def run_window(app: tc.App, person: Callable[[tc.App], Awaitable[None]]) -> None:
    """Run the window with `person` as its Trio script, until the script closes it."""
    app.start(person)
    app.root.mainloop()
    assert app.trio_outcome is not None
    app.trio_outcome.unwrap()


def window_received(app: tc.App, frame_type: str) -> list[dict[str, Any]]:
    return [
        entry.frame
        for entry in app.entries
        if entry.direction == "in" and entry.frame and entry.frame.get("type") == frame_type
    ]


def status(app: tc.App) -> tuple[str, str]:
    """The status line as shown: its text and its colour."""
    return str(app.state_label.cget("text")), str(app.state_label.cget("fg"))


@pytest.mark.gui
def test_window_connects_sends_and_shows_the_reply(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    app = open_window(xvfb, handler_process.url, user="alice")
    root = app.root
    steps: list[str] = []

    def received(frame_type: str) -> list[dict[str, Any]]:
        return window_received(app, frame_type)

    async def person(app: tc.App) -> None:
        # What a person does: get a token, connect, start a chat from the template, say hello.
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: received("authenticated"))
        steps.append("connected")
        assert status(app) == ("● connected as alice", tc.GREEN)
        app.editor.delete("1.0", "end")
        app.editor.insert("1.0", '{"type": "create_chat", "recipient_id": "bob"}')
        app.send_button.invoke()
        await wait_until(lambda: received("new_chats"))
        steps.append("chat created")
        app.template_buttons["send_message"].invoke()
        template = json.loads(app.editor.get("1.0", "end"))
        assert template["chat_id"] == received("new_chats")[0]["data"][0]["chat_id"]
        assert template["recipient_id"] == "bob"
        app.editor.focus_force()
        app.editor.event_generate("<Control-Return>", when="tail")  # the keyboard shortcut
        await wait_until(lambda: received("message"))
        steps.append("message acknowledged")
        assert received("message")[0]["client_message_id"] == template["client_message_id"]
        app.editor.delete("1.0", "end")
        app.editor.insert("1.0", '{"type": "fetch_messages", "chat_id": "no-such-chat"}')
        app.send_button.invoke()
        await wait_until(lambda: received("error"))
        steps.append("error shown")
        shown = app.log.get("1.0", "end")
        assert "→ out  send_message" in shown
        assert "← in   message" in shown
        assert "error not_found" in shown
        app.history_older()
        assert "fetch_messages" in app.editor.get("1.0", "end")
        app.root.event_generate("<Motion>", warp=True, x=WINDOW[0] - 1, y=WINDOW[1] - 1)
        await trio.sleep(0.2)  # let Tk paint before the screenshot
        save_screenshot(xvfb.screenshot(), "screenshot-tk-first-message.png")
        app.close()

    app.start(person)
    root.mainloop()
    assert app.trio_outcome is not None
    app.trio_outcome.unwrap()
    assert steps == ["connected", "chat created", "message acknowledged", "error shown"]


class Peer:
    """The other person of a window test: a plain WebSocket, bound with a dev token."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    @classmethod
    @asynccontextmanager
    async def connect(cls, server: HandlerProcess, user_id: str) -> AsyncIterator[Peer]:
        token = await trio.to_thread.run_sync(server.dev_token, user_id)
        url = tc.with_token(tc.resolve_endpoints(server.url).ws, token)
        async with trio_websocket.open_websocket_url(url) as ws, trio.open_nursery() as nursery:
            peer = cls(ws)
            nursery.start_soon(peer._read)
            await wait_until(lambda: peer.received("authenticated"))
            yield peer
            nursery.cancel_scope.cancel()

    async def _read(self) -> None:
        while True:
            self.frames.append(json.loads(await self.ws.get_message()))

    def received(self, frame_type: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame.get("type") == frame_type]

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))


@pytest.mark.gui
def test_window_reads_edits_and_deletes_with_its_templates(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # Version 2 through the window: every frame below is a template's, unchanged, and the
    # server's answers (receipts, message_updated, the chat list with its unread count) are
    # shown in the log with what they say in their header line.
    app = open_window(xvfb, handler_process.url, user="alice")

    def received(frame_type: str) -> list[dict[str, Any]]:
        return window_received(app, frame_type)

    def send_template(name: str) -> dict[str, Any]:
        app.template_buttons[name].invoke()
        frame: dict[str, Any] = json.loads(app.editor.get("1.0", "end"))
        app.send_button.invoke()
        return frame

    def read_receipts(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return [(r["user_id"], r["seq"]) for r in frames if r.get("kind") == "read"]

    async def person(app: tc.App) -> None:
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        async with Peer.connect(handler_process, "bob") as bob:
            await bob.send(type="create_chat", recipient_id="alice")
            await wait_until(lambda: bob.received("new_chats"))
            chat_id = bob.received("new_chats")[0]["data"][0]["chat_id"]
            await bob.send(type="send_message", chat_id=chat_id, recipient_id="alice", content="1")
            await wait_until(lambda: received("message"))
            first = received("message")[0]
            assert (first["seq"], first["sender_id"]) == (1, "bob")

            mark = send_template("mark_read")
            assert (mark["chat_id"], mark["message_id"]) == (chat_id, first["message_id"])
            await wait_until(lambda: read_receipts(received("receipt")))
            assert read_receipts(received("receipt")) == [("alice", 1)]
            await wait_until(lambda: read_receipts(bob.received("receipt")) == [("alice", 1)])

            sent = send_template("send_message")
            assert (sent["chat_id"], sent["recipient_id"]) == (chat_id, "bob")
            await wait_until(lambda: len(received("message")) == 2)
            mine = received("message")[1]
            assert (mine["seq"], mine["sender_id"]) == (2, "alice")
            await bob.send(type="send_message", chat_id=chat_id, recipient_id="alice", content="3")
            await wait_until(lambda: len(received("message")) == 3)
            # Delivery receipts are coalesced (sent up to ~100 ms later): let any about this
            # message come now, so that the screenshot below shows the same frames every time.
            with trio.move_on_after(0.5):
                await wait_until(lambda: any(r["seq"] == 3 for r in received("receipt")))

            send_template(tc.CHAT_LIST)
            await wait_until(lambda: received("all_chats"))
            listed = received("all_chats")[0]["data"]
            assert [(c["chat_id"], c["unread_count"]) for c in listed] == [(chat_id, 1)]
            assert listed[0]["read_up_to"]["alice"] == 2  # her own message moved it

            edit = send_template("edit_message")
            assert (edit["chat_id"], edit["message_id"]) == (chat_id, mine["message_id"])
            await wait_until(lambda: received("message_updated"))
            edited = received("message_updated")[0]
            assert (edited["content"], edited["seq"]) == (edit["content"], 2)
            assert edited["edited_at"]
            delete = send_template("delete_message")
            assert delete["message_id"] == mine["message_id"]
            await wait_until(lambda: len(received("message_updated")) == 2)
            assert received("message_updated")[1]["deleted"] is True
            await wait_until(lambda: len(bob.received("message_updated")) == 2)
            # The tombstone is not offered for editing again.
            app.template_buttons["edit_message"].invoke()
            assert json.loads(app.editor.get("1.0", "end"))["message_id"] == "MESSAGE_ID"

            mark = send_template("mark_read")
            assert mark["message_id"] == received("message")[2]["message_id"]
            await wait_until(lambda: ("alice", 3) in read_receipts(received("receipt")))
        assert received("all_messages") == []  # limit 0: the chat list only
        shown = app.log.get("1.0", "end")
        for header in (
            "→ out  mark_read",
            "← in   receipt  alice read up to seq 1",
            "← in   message  seq 1, bob → alice",
            "← in   all_chats  1 chat, 1 unread",
            "← in   message_updated  seq 2, alice → bob, edited",
            "← in   message_updated  seq 2, alice → bob, deleted",
            "← in   receipt  alice read up to seq 3",
        ):
            assert header in shown, header
        # The screenshot shows the end of the delete's answer, the mark_read and its receipt
        # (the group row of templates leaves no room for all of the delete's answer).
        app.log.yview(app.log.search("→ out  mark_read", "end", backwards=True))
        app.log.yview_scroll(-8, "units")
        app.root.event_generate("<Motion>", warp=True, x=WINDOW[0] - 1, y=WINDOW[1] - 1)
        await trio.sleep(0.2)  # let Tk paint before the screenshot
        save_screenshot(xvfb.screenshot(), "screenshot-tk.png", docs=True)
        app.close()

    run_window(app, person)


def send_template(app: tc.App, name: str) -> dict[str, Any]:
    """Press a template's button, then Send: the frame goes out as the template made it."""
    app.template_buttons[name].invoke()
    frame: dict[str, Any] = json.loads(app.editor.get("1.0", "end"))
    app.send_button.invoke()
    return frame


@pytest.mark.gui
def test_window_creates_a_group_and_follows_its_members(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # Groups through the window: every frame alice sends is a template's, unchanged. Her
    # window learns the group from new_chats, its members from chat_updated, and drops a
    # group she was removed from.
    app = open_window(xvfb, handler_process.url, user="alice")

    def received(frame_type: str) -> list[dict[str, Any]]:
        return window_received(app, frame_type)

    def participants(frame: dict[str, Any]) -> list[str]:
        members: list[str] = frame["data"]["participants"]
        return members

    def updates(chat_id: str, frames: list[dict[str, Any]] | None = None) -> list[list[str]]:
        """The members each chat_updated of that chat (to the window, or in `frames`) lists."""
        frames = received("chat_updated") if frames is None else frames
        return [participants(f) for f in frames if f["data"]["chat_id"] == chat_id]

    async def person(app: tc.App) -> None:
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        async with (
            Peer.connect(handler_process, "bob") as bob,
            Peer.connect(handler_process, "dave") as dave,
        ):
            # bob's group: he removes alice, and her window forgets it.
            await bob.send(type="create_group", title="Bob's", member_ids=["alice"])
            await wait_until(lambda: received("new_chats"))
            club_id = received("new_chats")[0]["data"][0]["chat_id"]
            assert app.context.group_id == club_id
            assert send_template(app, "remove_member") == {
                "type": "remove_member",
                "chat_id": club_id,
                "user_id": "alice",  # not her group: she can only leave it
            }
            await wait_until(lambda: updates(club_id))
            assert updates(club_id)[-1] == ["bob"]
            assert club_id not in app.context.chats
            assert app.context.group_id is None
            assert str(app.group_label.cget("text")) == "group: none yet"

            create = send_template(app, "create_group")
            assert (create["title"], create["member_ids"]) == ("Team", ["bob", "carol"])
            await wait_until(lambda: len(received("new_chats")) == 2)
            team = received("new_chats")[1]["data"][0]
            assert (team["kind"], team["title"], team["created_by"]) == ("group", "Team", "alice")
            assert team["participants"] == ["alice", "bob", "carol"]
            team_id = team["chat_id"]
            await wait_until(lambda: len(bob.received("new_chats")) == 2)
            assert bob.received("new_chats")[1]["data"][0]["chat_id"] == team_id

            hello = send_template(app, tc.GROUP_MESSAGE)
            assert hello["chat_id"] == team_id
            assert "recipient_id" not in hello
            await wait_until(lambda: received("message") and bob.received("message"))
            assert bob.received("message")[0]["client_message_id"] == hello["client_message_id"]
            assert "recipient_id" not in bob.received("message")[0]

            add = send_template(app, "add_members")
            assert (add["chat_id"], add["member_ids"]) == (team_id, ["dave"])
            await wait_until(lambda: updates(team_id))
            assert updates(team_id) == [["alice", "bob", "carol", "dave"]]
            assert app.context.chats[team_id].participants == ("alice", "bob", "carol", "dave")
            # A member before the change gets it too.
            await wait_until(lambda: updates(team_id, bob.received("chat_updated")))
            assert updates(team_id, bob.received("chat_updated")) == updates(team_id)
            await wait_until(lambda: dave.received("new_chats"))  # the new member: a new chat
            assert dave.received("new_chats")[0]["data"][0]["chat_id"] == team_id

            remove = send_template(app, "remove_member")  # her group: she removes the last one
            assert (remove["chat_id"], remove["user_id"]) == (team_id, "dave")
            await wait_until(lambda: len(updates(team_id)) == 2)
            assert updates(team_id)[1] == ["alice", "bob", "carol"]
            # The removed user's copy lists the members without him.
            await wait_until(lambda: dave.received("chat_updated"))
            assert updates(team_id, dave.received("chat_updated")) == [["alice", "bob", "carol"]]
            assert dave.received("new_chats")[0]["data"][0]["participants"] == updates(team_id)[0]
            assert app.context.group_id == team_id

        shown = app.log.get("1.0", "end")
        for header in (
            "→ out  create_group",
            'new_chats  1 chat, 0 unread; group "Team", 3 members',
            "→ out  add_members",
            '← in   chat_updated  group "Team", 4 members: alice, bob, carol, dave',
            '← in   chat_updated  group "Team", 3 members: alice, bob, carol',
            '← in   chat_updated  group "Bob\'s", 1 member: bob',
            f'alice is no longer a member of "Bob\'s" ({club_id}): dropped it',
        ):
            assert header in shown, header
        assert str(app.group_label.cget("text")) == f'group: {team_id} "Team", 3 members'
        # The screenshot: the group templates offered, the add_members and its chat_updated.
        app.template_buttons["add_members"].invoke()
        app.log.yview(app.log.search("→ out  add_members", "1.0"))
        app.root.event_generate("<Motion>", warp=True, x=WINDOW[0] - 1, y=WINDOW[1] - 1)
        await trio.sleep(0.2)  # let Tk paint before the screenshot
        save_screenshot(xvfb.screenshot(), "screenshot-tk-groups.png")
        app.close()

    run_window(app, person)


PRESENCE_GRACE_S = 0.5  # how long the server below waits before it announces someone offline


@pytest.fixture
def quick_presence_process(tmp_path: Path) -> Iterator[HandlerProcess]:
    # Going offline is announced after presence_grace_s: half a second here, not five.
    server = HandlerProcess(
        tmp_path, extra={"limits": {"auth_timeout_s": 0.5, "presence_grace_s": PRESENCE_GRACE_S}}
    )
    server.start()
    yield server
    server.stop()


def typing_shown(app: tc.App) -> str:
    return str(app.typing_label.cget("text"))


def people_shown(app: tc.App) -> str:
    return str(app.people_label.cget("text"))


@pytest.mark.gui
def test_window_shows_typing_presence_and_blocks(
    xvfb: Xvfb, quick_presence_process: HandlerProcess
) -> None:
    # Typing, presence and blocking through the window: every frame alice sends is a template's,
    # unchanged. bob is a plain WebSocket, and so is alice's second device.
    server = quick_presence_process
    app = open_window(xvfb, server.url, user="alice")

    def received(frame_type: str) -> list[dict[str, Any]]:
        return window_received(app, frame_type)

    def errors(peer: Peer) -> list[tuple[str, str]]:
        return [(error["code"], error["message"]) for error in peer.received("error")]

    async def person(app: tc.App) -> None:
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        async with (
            Peer.connect(server, "bob") as bob,
            Peer.connect(server, "alice") as other_device,
        ):
            await bob.send(type="create_chat", recipient_id="alice")
            await wait_until(lambda: received("new_chats"))
            chat_id = received("new_chats")[0]["data"][0]["chat_id"]

            # Presence: of the contacts by name, and of all of them; bob is online.
            asked = send_template(app, tc.PRESENCE_OF)
            assert asked == {"type": "fetch_presence", "user_ids": ["bob"]}
            await wait_until(lambda: received("presence"))
            assert people_shown(app) == "● bob"
            count = len(received("presence"))
            assert send_template(app, "fetch_presence") == {"type": "fetch_presence"}
            await wait_until(lambda: len(received("presence")) > count)
            assert received("presence")[-1]["data"] == [
                {"user_id": "bob", "online": True, "last_seen": None}
            ]

            # Typing: shown until bob stops, sends the message, or lets it expire.
            await bob.send(type="typing", chat_id=chat_id, active=True)
            await wait_until(lambda: typing_shown(app))
            assert typing_shown(app) == f"bob is typing… (chat {chat_id})"
            assert received("typing")[-1] == {
                "type": "typing",
                "chat_id": chat_id,
                "user_id": "bob",
                "active": True,
                "expires_in_ms": 6000,
            }
            await bob.send(type="typing", chat_id=chat_id, active=False)
            await wait_until(lambda: not typing_shown(app))
            # After a stop, typing again is not a repeat: it is shown at once.
            await bob.send(type="typing", chat_id=chat_id)
            await wait_until(lambda: typing_shown(app))
            await bob.send(type="send_message", chat_id=chat_id, recipient_id="alice", content="hi")
            await wait_until(lambda: received("message"))
            assert typing_shown(app) == ""  # his message ended it
            # Typing right after his message is news again: shown at once.
            await bob.send(type="typing", chat_id=chat_id)
            await wait_until(lambda: typing_shown(app))
            shown_at = trio.current_time()
            # Meanwhile alice types: bob sees it, her own devices do not.
            sent = send_template(app, "typing")
            assert sent == {"type": "typing", "chat_id": chat_id, "active": True}
            await wait_until(lambda: bob.received("typing"))
            assert bob.received("typing")[-1]["user_id"] == "alice"
            assert all(frame["user_id"] == "bob" for frame in received("typing"))
            assert all(frame["user_id"] == "bob" for frame in other_device.received("typing"))

            await wait_until(lambda: not typing_shown(app), timeout=10)
            assert trio.current_time() - shown_at > 5.0  # its expires_in_ms, 6 s, ran out

            # alice blocks bob: her window shows the list, and bob as a stranger sees him.
            assert send_template(app, "block_user") == {"type": "block_user", "user_id": "bob"}
            await wait_until(lambda: received("blocked"))
            assert received("blocked")[0]["data"] == ["bob"]
            await wait_until(lambda: people_shown(app) == "○ bob   blocked: bob")
            # Her other device gets the list too; bob only sees her as a stranger.
            await wait_until(lambda: other_device.received("blocked"))
            assert other_device.received("blocked")[0] == {"type": "blocked", "data": ["bob"]}
            await wait_until(
                lambda: (
                    {"user_id": "alice", "online": False, "last_seen": None}
                    in [entry for frame in bob.received("presence") for entry in frame["data"]]
                )
            )
            assert bob.received("blocked") == []
            # Neither side may write or type in their direct chat now.
            await bob.send(type="send_message", chat_id=chat_id, recipient_id="alice", content="?")
            await bob.send(type="typing", chat_id=chat_id)
            await bob.send(type="create_chat", recipient_id="alice")
            await wait_until(lambda: len(errors(bob)) == 3)
            for code, text in errors(bob):
                assert code == "forbidden"
                assert "a block is in place" in text
            typed = len(received("typing"))
            send_template(app, "typing")
            await wait_until(lambda: received("error"))
            assert received("error")[0]["code"] == "forbidden"
            assert "a block is in place" in received("error")[0]["message"]
            assert len(received("typing")) == typed  # bob's typing did not come through
            assert len(received("message")) == 1

            # The other device unblocks him: the window's list follows, bob is online again.
            app.template_buttons["unblock_user"].invoke()
            assert json.loads(app.editor.get("1.0", "end")) == {
                "type": "unblock_user",
                "user_id": "bob",
            }
            blocked_before = len(received("blocked"))
            await other_device.send(type="unblock_user", user_id="bob", request_id="u1")
            await wait_until(lambda: len(other_device.received("blocked")) == 2)
            assert other_device.received("blocked")[1] == {
                "type": "blocked",
                "data": [],
                "request_id": "u1",
            }
            await wait_until(lambda: len(received("blocked")) > blocked_before)
            await wait_until(lambda: people_shown(app) == "● bob   blocked: nobody")
            assert send_template(app, "fetch_blocked") == {"type": "fetch_blocked"}
            await wait_until(lambda: len(received("blocked")) > blocked_before + 1)
            assert received("blocked")[-1]["data"] == []

            # The screenshot: bob typing, his presence and the list in the people row. (His
            # typing refused above did not go out: this one, a moment later, does.)
            await bob.send(type="typing", chat_id=chat_id)
            await wait_until(lambda: typing_shown(app))
            app.template_buttons["block_user"].invoke()
            app.root.event_generate("<Motion>", warp=True, x=WINDOW[0] - 1, y=WINDOW[1] - 1)
            await trio.sleep(0.2)  # let Tk paint before the screenshot
            save_screenshot(xvfb.screenshot(), "screenshot-tk-people.png")
        # bob left: once the grace period is over the window shows when he was last seen.
        await wait_until(lambda: people_shown(app).startswith("○ bob "), timeout=10)
        assert re.fullmatch(r"○ bob \d\d:\d\d   blocked: nobody", people_shown(app))
        last = received("presence")[-1]["data"]
        assert [(entry["user_id"], entry["online"]) for entry in last] == [("bob", False)]
        assert last[0]["last_seen"].endswith("Z")
        # His connection closed while he was typing: the server said he stopped (well before
        # the 6 s were up).
        assert typing_shown(app) == ""
        assert received("typing")[-1]["active"] is False
        shown = app.log.get("1.0", "end")
        for header in (
            "→ out  fetch_presence",
            "← in   presence  bob online",
            f"← in   typing  bob is typing in chat {chat_id} (6 s)",
            f"← in   typing  bob stopped typing in chat {chat_id}",
            "→ out  block_user",
            "← in   blocked  1 user: bob",
            "← in   presence  bob offline",
            "← in   error forbidden",
            "← in   blocked  nobody",
            "← in   presence  bob last seen ",
        ):
            assert header in shown, header
        app.close()

    run_window(app, person)


@pytest.mark.gui
def test_window_shows_a_refused_token_in_red_and_asks_for_a_new_one(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # A pasted token the server does not accept (signed before a secret rotation): the window
    # must not look connected, and must not reconnect with it in a loop.
    app = open_window(xvfb, handler_process.url, user="alice", token=foreign_token("alice"))
    refusal = "1008 not authenticated in time (invalid token: InvalidSignatureError)"

    async def person(app: tc.App) -> None:
        app.connect_button.invoke()
        await wait_until(lambda: window_received(app, "error"))
        assert status(app) == (
            "● connected, not signed in: invalid token: InvalidSignatureError",
            tc.RED,
        )
        await wait_until(lambda: status(app)[0].startswith("● disconnected"))
        assert status(app) == (f"● disconnected: {refusal}", tc.RED)
        await trio.sleep(1.0)  # longer than the first backoff: nothing tries again
        closes = [entry for entry in app.entries if entry.text.startswith("connection closed")]
        assert [entry.text for entry in closes] == [f"connection closed: {refusal}"]
        assert str(app.connect_button.cget("state")) == "normal"
        assert app.token_entry.selection_present()  # selected, ready to paste over
        assert "paste a new token, or press Get dev token, then Connect" in app.log.get(
            "1.0", "end"
        )
        save_screenshot(xvfb.screenshot(), "screenshot-tk-refused-token.png")
        app.close()

    run_window(app, person)


@pytest.mark.gui
def test_window_renews_its_dev_token_after_the_server_changed_its_secret(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # The server restarts with a new secret: the old dev token is refused (1008), and since the
    # window fetched it itself, it fetches a new one once and is signed in again.
    app = open_window(xvfb, handler_process.url, user="alice")

    async def person(app: tc.App) -> None:
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        first_token = app.token_var.get()
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        handler_process.use_secret("a-new-secret-after-a-redeploy-0123456789")
        await trio.to_thread.run_sync(handler_process.stop)
        await wait_until(lambda: app.link.state == "waiting")  # the 1001: back off, retry
        await trio.to_thread.run_sync(handler_process.start)
        await wait_until(
            lambda: app.token_var.get() != first_token and app.link.sign_in.user_id == "alice",
            timeout=30,
        )
        assert status(app) == ("● connected as alice", tc.GREEN)
        shown = app.log.get("1.0", "end")
        assert "connection closed: 1001 server shutting down" in shown
        assert "connection closed: 1008 not authenticated in time (invalid token" in shown
        assert shown.count("the server refused the token: a new one for 'alice'") == 1
        app.close()

    run_window(app, person)


def record_statuses(app: tc.App) -> list[tuple[str, str]]:
    """Every status line the window shows from now on, with its colour, in order."""
    shown: list[tuple[str, str]] = []
    link_state = app.link_state

    def recording(state: str, detail: str) -> None:
        link_state(state, detail)
        shown.append(status(app))

    app.link_state = recording
    return shown


@pytest.mark.gui
def test_window_is_not_green_when_its_token_is_stale_on_reconnect(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # Signed in with a pasted token; the server restarts with a new secret, so on reconnect the
    # same token is stale: the status must say the connection is open but not signed in (red,
    # with the server's reason), then stop, never green.
    token = handler_process.dev_token("alice")
    app = open_window(xvfb, handler_process.url, user="alice", token=token)
    shown = record_statuses(app)
    refusal = "1008 not authenticated in time (invalid token: InvalidSignatureError)"

    async def person(app: tc.App) -> None:
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        assert status(app) == ("● connected as alice", tc.GREEN)
        handler_process.use_secret("a-new-secret-after-a-redeploy-0123456789")
        await trio.to_thread.run_sync(handler_process.stop)
        await wait_until(lambda: app.link.state == "waiting")
        since = len(shown)
        await trio.to_thread.run_sync(handler_process.start)
        await wait_until(lambda: window_received(app, "error"), timeout=30)
        assert status(app) == (
            "● connected, not signed in: invalid token: InvalidSignatureError",
            tc.RED,
        )
        await wait_until(lambda: status(app)[0].startswith("● disconnected"))
        assert status(app) == (f"● disconnected: {refusal}", tc.RED)
        after = shown[since:]
        assert all(colour != tc.GREEN for _, colour in after), after
        assert ("● connected, not signed in", tc.AMBER) in after  # open, not yet answered
        assert len(window_received(app, "authenticated")) == 1  # only the first connection
        assert app.token_entry.selection_present()
        await trio.sleep(0.2)  # let Tk paint before the screenshot
        save_screenshot(xvfb.screenshot(), "screenshot-tk-stale-token.png")
        app.close()

    run_window(app, person)


@pytest.mark.gui
def test_window_uses_a_new_dev_token_on_the_next_connect(
    xvfb: Xvfb, handler_process: HandlerProcess
) -> None:
    # Get dev token while connected: the open connection stays as it is (the server does not
    # rebind it), and the reconnect after the server restarted signs in with the new token.
    app = open_window(xvfb, handler_process.url, user="alice")

    async def person(app: tc.App) -> None:
        app.dev_token_button.invoke()
        await wait_until(app.token_var.get)
        app.connect_button.invoke()
        await wait_until(lambda: app.link.sign_in.user_id == "alice")
        alice_token = app.token_var.get()
        app.user_var.set("bob")
        app.dev_token_button.invoke()
        await wait_until(lambda: app.token_var.get() != alice_token)
        await wait_until(lambda: "the next reconnect signs in with it" in app.log.get("1.0", "end"))
        assert "this connection stays signed in as 'alice'" in app.log.get("1.0", "end")
        assert status(app) == ("● connected as alice", tc.GREEN)
        assert app.link.token == app.token_var.get()
        await trio.to_thread.run_sync(handler_process.stop)
        await wait_until(lambda: app.link.state == "waiting")
        await trio.to_thread.run_sync(handler_process.start)
        await wait_until(lambda: app.link.sign_in.user_id == "bob", timeout=30)
        assert status(app) == ("● connected as bob", tc.GREEN)
        signed_in = [frame["user_id"] for frame in window_received(app, "authenticated")]
        assert signed_in == ["alice", "bob"]
        app.close()

    run_window(app, person)


# ----------------------------------------------------------------------------- running it, docs


def run_client_without(*modules: str) -> subprocess.CompletedProcess[str]:
    """`test_client.py` run as a script by this Python with `modules` made unimportable."""
    run_as_script = (
        f"import runpy, sys; sys.modules.update(dict.fromkeys({list(modules)!r})); "
        "sys.argv = ['test_client.py']; runpy.run_path('test_client.py', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", run_as_script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("missing", "named"),
    [
        (["trio"], "trio"),
        (["trio_websocket"], "trio_websocket"),
        (["h11"], "h11"),
        (["handler"], "handler"),
        # A stock Debian python3 has neither: the venv is the answer, so it comes first.
        (["tkinter", "trio"], "trio"),
    ],
)
def test_without_its_packages_the_client_says_how_to_run_it(missing: list[str], named: str) -> None:
    result = run_client_without(*missing)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith(f"test_client: cannot import {named}: ")
    assert "run it with the server's venv: .venv/bin/python test_client.py" in result.stderr
    assert "pip install -e ." in result.stderr


def test_without_tk_the_client_says_what_to_install() -> None:
    result = run_client_without("tkinter")
    assert (result.returncode, result.stderr.count("\n")) == (2, 1), result.stderr
    assert result.stderr.startswith("test_client: cannot import tkinter: ")
    assert "apt-get install python3-tk" in result.stderr


def test_a_python_without_site_packages_gets_the_hint_not_a_traceback() -> None:
    # `-S`: this very interpreter without its site-packages, as a stock Python would be.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "test_client.py", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert ".venv/bin/python test_client.py" in result.stderr


def test_docs_run_the_client_with_the_venv_python() -> None:
    # The README's quick start makes `.venv`; a bare `python` has none of the packages.
    module_doc = tc.__doc__
    assert module_doc is not None
    sources = {
        "test_client.py": module_doc,
        "docs/clients.md": (REPO_ROOT / "docs" / "clients.md").read_text(encoding="utf-8"),
        "README.md": (REPO_ROOT / "README.md").read_text(encoding="utf-8"),
    }
    for name, text in sources.items():
        commands = re.findall(r"(\S*)\s+test_client\.py", text)
        pythons = [command.strip("`") for command in commands if "python" in command]
        assert pythons, name
        assert set(pythons) == {".venv/bin/python"}, (name, pythons)


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_clients_md_cites_protocol_sections_that_exist() -> None:
    protocol_md = (REPO_ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    headings = {
        github_anchor(line.lstrip("#")): line.lstrip("#").strip()
        for line in protocol_md.splitlines()
        if line.startswith("#")
    }
    clients_md = (REPO_ROOT / "docs" / "clients.md").read_text(encoding="utf-8")
    links = re.findall(r"\[([^\]]+)\]\(protocol\.md#([^)]+)\)", clients_md)
    assert links
    for text, anchor in links:
        assert anchor in headings, f"docs/protocol.md has no section #{anchor}"
        assert text == headings[anchor], (text, headings[anchor])
    # The "protocol section" column of the table cites sections by link only.
    table = clients_md.split("### How it follows the protocol", 1)[1].split("\n\n")[1]
    for row in table.splitlines()[2:]:
        cell = row.strip().strip("|").split("|")[-1].strip()
        rest = re.sub(r"\[[^\]]+\]\(protocol\.md#[^)]+\)", "", cell)
        assert rest.replace(",", "").strip() in ("", "—"), row
