"""End to end: the HTTP API for backends (`/api/v1/`), on a real server and real sockets.

Every answer is checked against the OpenAPI document the server serves (the schema of its
path, method and status), so the document cannot drift from the server. The module runs a
second time on two nodes (`test_e2e_cluster`): HTTP goes to the first node while the
WebSocket connections alternate between both, so fan-out and disconnect cross nodes.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import jsonschema
from conftest import StartServer
from support import RunningServer, backlog_messages, http_request, wait_until

from handler.api.openapi import OPENAPI

KEY: Final = "backend-key-0123456789abcdef"
OTHER_KEY: Final = "second-backend-key-0123456789"
PREFIX: Final = "/api/v1"


# --------------------------------------------------------------------------- the client


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("^" + "[^?]+".join(re.escape(part) for part in parts) + "$")


_TEMPLATES: Final = [(_template_pattern(path), path) for path in OPENAPI["paths"]]


def _validate(schema: Mapping[str, Any], body: Any) -> None:
    # `$ref`s point into the document's components: validate under a root that has them.
    root = {"allOf": [schema], "components": OPENAPI["components"]}
    jsonschema.Draft202012Validator(root).validate(body)


def check_documented(method: str, path: str, status: int, body: Any) -> None:
    """The answer is one the document describes for its path, method and status."""
    bare = urllib.parse.unquote(path.partition("?")[0])
    relative = bare.removeprefix(PREFIX)
    for pattern, template in _TEMPLATES:
        operation = OPENAPI["paths"][template].get(method.lower())
        if operation is not None and pattern.match(relative):
            responses = operation["responses"]
            assert str(status) in responses, f"{method} {template} does not document {status}"
            _validate(responses[str(status)]["content"]["application/json"]["schema"], body)
            return
    # No such endpoint: the answer is an error all the same.
    assert status in (401, 404, 429), (method, path, status)
    _validate({"$ref": "#/components/schemas/Error"}, body)


@attrs.frozen
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


async def call(
    server: RunningServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
    authorization: str | None = None,
    api_on: bool = True,
) -> Answer:
    """One API request; the answer is checked against the OpenAPI document (which describes
    the API where it exists: with `api_on` False every answer is an error)."""
    headers = [("Content-Type", "application/json")]
    if authorization is not None:
        headers.append(("Authorization", authorization))
    elif key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    response = await http_request(server, method, PREFIX + path, data, headers)
    assert response.headers["content-type"].startswith("application/json"), response
    answer = Answer(response.status, response.json(), response.headers)
    if api_on:
        check_documented(method, PREFIX + path, answer.status, answer.body)
    else:
        _validate({"$ref": "#/components/schemas/Error"}, answer.body)
    return answer


def assert_error(answer: Answer, status: int, code: str, field: str | None = None) -> None:
    assert answer.status == status, answer
    assert answer.body["code"] == code, answer
    assert answer.body.get("field") == field, answer


async def start_api(start_server: StartServer, **api: Any) -> RunningServer:
    return await start_server(api={"keys": [KEY, OTHER_KEY], **api})


async def direct_chat(server: RunningServer, user: str, other: str) -> dict[str, Any]:
    answer = await call(server, "POST", "/chats", {"user_id": user, "recipient_id": other})
    assert answer.status in (200, 201), answer
    chat: dict[str, Any] = answer.body
    return chat


async def post(server: RunningServer, **body: Any) -> Answer:
    return await call(server, "POST", "/messages", body)


def messages_in(frames: Sequence[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "message" and f["message_id"] == message_id]


# --------------------------------------------------------------------------- keys


async def test_without_keys_every_api_path_is_404(server: RunningServer) -> None:
    for method, path in (
        ("GET", "/openapi.json"),
        ("POST", "/messages"),
        ("GET", "/users/alice/chats"),
        ("POST", "/users/alice/disconnect"),
        ("GET", "/nothing/here"),
        ("OPTIONS", "/messages"),
    ):
        answer = await call(server, method, path, {}, key=KEY, api_on=False)
        assert_error(answer, 404, "not_found")


async def test_a_missing_or_wrong_key_is_401(start_server: StartServer) -> None:
    server = await start_api(start_server)
    for authorization in (
        None,
        "",
        "Bearer",
        "Bearer wrong-key-0123456789abcdef",
        f"Bearer {KEY[:-1]}",
        f"Bearer {KEY}x",
        f"Basic {KEY}",
        KEY,
    ):
        for method, path in (("GET", "/openapi.json"), ("POST", "/messages"), ("GET", "/x")):
            answer = await call(server, method, path, {}, key=None, authorization=authorization)
            assert_error(answer, 401, "unauthorized")
            assert answer.headers["www-authenticate"] == "Bearer"
    for key in (KEY, OTHER_KEY):
        assert (await call(server, "GET", "/openapi.json", key=key)).status == 200
    lowercase = await call(server, "GET", "/openapi.json", authorization=f"bearer  {KEY}")
    assert lowercase.status == 200


async def test_unknown_paths_and_methods_are_404(start_server: StartServer) -> None:
    server = await start_api(start_server)
    for method, path in (
        ("GET", "/nothing"),
        ("GET", "/messages"),
        ("DELETE", "/chats"),
        ("OPTIONS", "/chats"),
        ("PUT", "/users/alice/disconnect"),
    ):
        assert_error(await call(server, method, path, {}), 404, "not_found")


async def test_ids_with_a_newline_get_json_answers(start_server: StartServer) -> None:
    """A percent-encoded newline in a path id used to match no route (werkzeug's `path`
    stops at a newline) and got the framework's HTML 404."""
    server = await start_api(start_server)
    assert_error(await call(server, "GET", "/chats/a%0Ab/messages"), 404, "not_found", "chat_id")
    assert_error(await call(server, "GET", "/users/a%0Ab/chats"), 400, "bad_request", "user_id")
    assert_error(await call(server, "GET", "/no%0Athing"), 404, "not_found")


async def test_over_the_key_rate_is_429(start_server: StartServer) -> None:
    server = await start_api(start_server, rate_per_s=0.5, rate_burst=2)
    for _ in range(2):
        assert (await call(server, "GET", "/openapi.json")).status == 200
    answer = await call(server, "GET", "/openapi.json")
    assert_error(answer, 429, "rate_limited")
    assert answer.body["retry_after_ms"] > 0
    assert int(answer.headers["retry-after"]) >= 1
    assert (await call(server, "GET", "/openapi.json", key=OTHER_KEY)).status == 200


async def test_the_openapi_document_is_served_and_covers_every_route(
    start_server: StartServer,
) -> None:
    server = await start_api(start_server)
    answer = await call(server, "GET", "/openapi.json")
    assert answer.status == 200
    assert answer.body == json.loads(json.dumps(OPENAPI))
    assert answer.body["openapi"] == "3.1.0"
    for schema in OPENAPI["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule).removeprefix(PREFIX), method.lower())
        for rule in server.app.url_map.iter_rules()
        if rule.rule.startswith(PREFIX + "/")
        for method in rule.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in OPENAPI["paths"].items() for method in item}
    assert routes == documented


# --------------------------------------------------------------------------- chats


async def test_direct_chat_is_idempotent_and_pushed_once(start_server: StartServer) -> None:
    server = await start_api(start_server)
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        created = await call(server, "POST", "/chats", {"user_id": "alice", "recipient_id": "bob"})
        assert created.status == 201
        chat = created.body
        assert chat["kind"] == "direct"
        assert chat["participants"] == ["alice", "bob"]
        assert chat["created_by"] == "alice"
        for client in (alice, bob):  # no connection asked: every one of both is told
            frame = await client.recv()
            assert frame["type"] == "new_chats", frame
            assert [c["chat_id"] for c in frame["data"]] == [chat["chat_id"]]
        again = await call(server, "POST", "/chats", {"user_id": "alice", "recipient_id": "bob"})
        reverse = await call(server, "POST", "/chats", {"user_id": "bob", "recipient_id": "alice"})
        assert (again.status, reverse.status) == (200, 200)
        assert again.body["chat_id"] == reverse.body["chat_id"] == chat["chat_id"]
        for client in (alice, bob):
            assert await client.sync() == []  # an existing chat is not pushed again


async def test_a_group_is_created_and_pushed_to_every_member(start_server: StartServer) -> None:
    server = await start_api(start_server)
    async with server.connect("alice") as alice, server.connect("carol") as carol:
        body = {"user_id": "alice", "title": "plans", "member_ids": ["bob", "carol"]}
        answer = await call(server, "POST", "/chats", body)
        assert answer.status == 201
        group = answer.body
        assert (group["kind"], group["title"]) == ("group", "plans")
        assert group["participants"] == ["alice", "bob", "carol"]
        for client in (alice, carol):
            frame = await client.recv()
            assert frame["type"] == "new_chats", frame
            assert frame["data"][0]["chat_id"] == group["chat_id"]
        second = await call(server, "POST", "/chats", body)
        assert second.status == 201
        assert second.body["chat_id"] != group["chat_id"]  # every call creates one
    async with server.connect("bob") as bob:  # offline when created: in the backlog
        backlog_chats = [
            c["chat_id"] for f in bob.backlog if f["type"] == "new_chats" for c in f["data"]
        ]
        assert group["chat_id"] in backlog_chats


async def test_create_chat_errors(start_server: StartServer) -> None:
    server = await start_api(start_server)
    cases: list[tuple[Any, int, str, str | None]] = [
        ({"recipient_id": "bob"}, 400, "bad_request", "user_id"),
        ({"user_id": 5, "recipient_id": "bob"}, 400, "bad_request", "user_id"),
        ({"user_id": " alice", "recipient_id": "bob"}, 400, "bad_request", "user_id"),
        ({"user_id": "alice", "recipient_id": "al\u200bice"}, 400, "bad_request", "recipient_id"),
        ({"user_id": "alice", "recipient_id": 7}, 400, "bad_request", "recipient_id"),
        ({"user_id": "alice", "recipient_id": "alice"}, 400, "bad_request", "recipient_id"),
        ({"user_id": "alice"}, 400, "bad_request", "recipient_id"),
        (
            {"user_id": "alice", "recipient_id": "bob", "title": "t", "member_ids": ["c"]},
            400,
            "bad_request",
            "recipient_id",
        ),
        ({"user_id": "alice", "member_ids": ["bob"]}, 400, "bad_request", "title"),
        ({"user_id": "alice", "title": "t"}, 400, "bad_request", "member_ids"),
        ({"user_id": "alice", "title": "t", "member_ids": "bob"}, 400, "bad_request", "member_ids"),
        ({"user_id": "alice", "title": "t", "member_ids": []}, 400, "bad_request", "member_ids"),
        (
            {"user_id": "alice", "title": "t", "member_ids": ["bob", "bob"]},
            400,
            "bad_request",
            "member_ids",
        ),
        (
            {"user_id": "alice", "title": "t", "member_ids": ["alice", "bob"]},
            400,
            "bad_request",
            "member_ids",
        ),
        (
            {"user_id": "alice", "title": "x" * 129, "member_ids": ["b"]},
            400,
            "bad_request",
            "title",
        ),
        ([], 400, "bad_json", None),
        ("alice", 400, "bad_json", None),
    ]
    for body, status, code, field in cases:
        assert_error(await call(server, "POST", "/chats", body), status, code, field)
    for raw in (b"", b"{", b'{"user_id": NaN}', b"\xff\xfe"):
        assert_error(await call(server, "POST", "/chats", raw=raw), 400, "bad_json")
    huge = json.dumps({"user_id": "alice", "recipient_id": "bob", "pad": "x" * 70_000})
    assert_error(await call(server, "POST", "/chats", raw=huge.encode()), 400, "too_large", "body")
    # Nothing was created by any of them.
    listed = await call(server, "GET", "/users/alice/chats")
    assert listed.body == {"data": []}


async def test_a_block_refuses_the_chat_and_its_messages(start_server: StartServer) -> None:
    server = await start_api(start_server)
    chat = await direct_chat(server, "alice", "bob")
    async with server.connect("bob") as bob:
        reply = await bob.request({"type": "block_user", "user_id": "alice"})
        assert reply["type"] == "blocked", reply
    refused = await call(server, "POST", "/chats", {"user_id": "alice", "recipient_id": "bob"})
    assert_error(refused, 403, "forbidden", "user_id")  # as the create_chat frame's answer
    sent = await post(server, sender_id="alice", chat_id=chat["chat_id"], content="hi")
    assert_error(sent, 403, "forbidden", "chat_id")


# --------------------------------------------------------------------------- messages


async def test_a_posted_message_reaches_every_socket_once_and_a_resend_none(
    start_server: StartServer,
) -> None:
    server = await start_api(start_server)
    chat = await direct_chat(server, "alice", "bob")
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("alice") as alice_tablet,
        server.connect("bob") as bob_tablet,
    ):
        sockets = (alice, bob, alice_tablet, bob_tablet)
        body = {
            "sender_id": "alice",
            "chat_id": chat["chat_id"],
            "content": "from the backend",
            "client_message_id": "order-42",
        }
        answer = await post(server, **body)
        assert answer.status == 201
        message = answer.body
        assert message["sender_id"] == "alice"
        assert message["recipient_id"] == "bob"  # optional for a direct chat: filled in
        assert message["content"] == "from the backend"
        assert message["client_message_id"] == "order-42"
        assert message["seq"] == 1
        for client in sockets:
            frame = await client.recv()
            assert frame == {"type": "message", **message}, frame  # no request_id: nobody asked
            assert messages_in(await client.sync(), message["message_id"]) == []
        resend = await post(server, **body, recipient_id="bob")
        assert resend.status == 201
        assert resend.body == message
        for client in sockets:
            assert messages_in(await client.sync(), message["message_id"]) == []
        # Over WebSocket the same resend is answered with the same stored message.
        ack = await alice.send_message(
            chat["chat_id"], "bob", "from the backend", client_message_id="order-42"
        )
        assert ack["message_id"] == message["message_id"]
        for client in (bob, alice_tablet, bob_tablet):
            assert messages_in(await client.sync(), message["message_id"]) == []
    page = await call(server, "GET", f"/chats/{chat['chat_id']}/messages")
    assert [m["message_id"] for m in page.body["data"]] == [message["message_id"]]


async def test_a_group_message_reaches_every_member(start_server: StartServer) -> None:
    server = await start_api(start_server)
    body = {"user_id": "alice", "title": "team", "member_ids": ["bob", "carol"]}
    group = (await call(server, "POST", "/chats", body)).body
    async with server.connect("bob") as bob, server.connect("carol") as carol:
        answer = await post(server, sender_id="alice", chat_id=group["chat_id"], content="hi")
        assert answer.status == 201
        assert "recipient_id" not in answer.body
        for client in (bob, carol):
            frame = await client.recv()
            assert frame == {"type": "message", **answer.body}, frame
    refused = await post(
        server, sender_id="alice", chat_id=group["chat_id"], content="hi", recipient_id="bob"
    )
    assert_error(refused, 400, "bad_request", "recipient_id")


async def test_post_message_errors(start_server: StartServer) -> None:
    server = await start_api(start_server)
    chat = (await direct_chat(server, "alice", "bob"))["chat_id"]
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"chat_id": chat, "content": "x"}, 400, "bad_request", "sender_id"),
        ({"sender_id": "", "chat_id": chat, "content": "x"}, 400, "bad_request", "sender_id"),
        ({"sender_id": "alice", "content": "x"}, 400, "bad_request", "chat_id"),
        ({"sender_id": "alice", "chat_id": 5, "content": "x"}, 400, "bad_request", "chat_id"),
        ({"sender_id": "alice", "chat_id": chat}, 400, "bad_request", "content"),
        ({"sender_id": "alice", "chat_id": chat, "content": ""}, 400, "bad_request", "content"),
        ({"sender_id": "alice", "chat_id": chat, "content": 3}, 400, "bad_request", "content"),
        (
            {"sender_id": "alice", "chat_id": chat, "content": "x" * 4097},
            400,
            "too_large",
            "content",
        ),
        (
            {"sender_id": "alice", "chat_id": chat, "content": "x", "client_message_id": ""},
            400,
            "bad_request",
            "client_message_id",
        ),
        (
            {"sender_id": "alice", "chat_id": chat, "content": "x", "recipient_id": "carol"},
            400,
            "bad_request",
            "recipient_id",
        ),
        (
            {"sender_id": "alice", "chat_id": chat, "content": "x", "recipient_id": "alice"},
            400,
            "bad_request",
            "recipient_id",
        ),
        ({"sender_id": "carol", "chat_id": chat, "content": "x"}, 403, "forbidden", "chat_id"),
        ({"sender_id": "alice", "chat_id": "999999", "content": "x"}, 404, "not_found", "chat_id"),
    ]
    for body, status, code, field in cases:
        assert_error(await post(server, **body), status, code, field)
    exactly = await post(server, sender_id="alice", chat_id=chat, content="x" * 4096)
    assert exactly.status == 201
    page = await call(server, "GET", f"/chats/{chat}/messages")
    assert [m["content"] for m in page.body["data"]] == ["x" * 4096]  # nothing else stored


# --------------------------------------------------------------------------- reads


async def test_chats_of_a_user_most_recently_active_first(start_server: StartServer) -> None:
    server = await start_api(start_server)
    with_bob = await direct_chat(server, "alice", "bob")
    with_carol = await direct_chat(server, "alice", "carol")
    listed = await call(server, "GET", "/users/alice/chats")
    assert [c["chat_id"] for c in listed.body["data"]] == [
        with_carol["chat_id"],
        with_bob["chat_id"],
    ]
    sent = await post(server, sender_id="bob", chat_id=with_bob["chat_id"], content="newest")
    listed = await call(server, "GET", "/users/alice/chats")
    chats = listed.body["data"]
    assert [c["chat_id"] for c in chats] == [with_bob["chat_id"], with_carol["chat_id"]]
    assert chats[0]["last_message"] == sent.body
    assert chats[0]["unread_count"] == 1
    assert (await call(server, "GET", "/users/nobody/chats")).body == {"data": []}
    odd = urllib.parse.quote("a/b c", safe="")
    assert (await call(server, "GET", f"/users/{odd}/chats")).body == {"data": []}
    for bad in ("%20alice", "ali%E2%80%8Bce", "x" * 129):
        assert_error(
            await call(server, "GET", f"/users/{bad}/chats"), 400, "bad_request", "user_id"
        )
    # Listing delivered nothing: carol's new chat and bob's message are still backlog.
    async with server.connect("carol") as carol:
        new_chats = [
            c["chat_id"] for f in carol.backlog if f["type"] == "new_chats" for c in f["data"]
        ]
        assert new_chats == [with_carol["chat_id"]]
    async with server.connect("alice") as alice:
        backlog = [m["message_id"] for m in backlog_messages(alice.backlog)]
        assert backlog == [sent.body["message_id"]]


async def test_history_pages_and_marks_nothing_delivered(start_server: StartServer) -> None:
    server = await start_api(start_server)
    chat = (await direct_chat(server, "alice", "bob"))["chat_id"]
    sent = [
        (await post(server, sender_id="alice", chat_id=chat, content=f"m{index}")).body
        for index in range(5)
    ]
    ids = [message["message_id"] for message in sent]
    whole = await call(server, "GET", f"/chats/{chat}/messages")
    assert whole.body == {"data": sent, "has_more": False}
    newest = await call(server, "GET", f"/chats/{chat}/messages?limit=2")
    assert [m["message_id"] for m in newest.body["data"]] == ids[3:]
    assert newest.body["has_more"] is True
    older = await call(server, "GET", f"/chats/{chat}/messages?limit=2&before={ids[3]}")
    assert [m["message_id"] for m in older.body["data"]] == ids[1:3]
    oldest = await call(server, "GET", f"/chats/{chat}/messages?limit=2&before={ids[1]}")
    assert (oldest.body["data"], oldest.body["has_more"]) == (sent[:1], False)
    # Bob read nothing: every message is still his backlog, once.
    async with server.connect("bob") as bob:
        assert [m["message_id"] for m in backlog_messages(bob.backlog)] == ids


async def test_history_errors(start_server: StartServer) -> None:
    server = await start_api(start_server)
    chat = (await direct_chat(server, "alice", "bob"))["chat_id"]
    other = (await direct_chat(server, "alice", "carol"))["chat_id"]
    foreign = (await post(server, sender_id="alice", chat_id=other, content="x")).body
    cases: list[tuple[str, int, str, str]] = [
        ("/chats/999999/messages", 404, "not_found", "chat_id"),
        (f"/chats/{chat}/messages?before={foreign['message_id']}", 400, "bad_request", "before"),
        (f"/chats/{chat}/messages?before=", 400, "bad_request", "before"),
        (f"/chats/{chat}/messages?limit=0", 400, "bad_request", "limit"),
        (f"/chats/{chat}/messages?limit=1001", 400, "bad_request", "limit"),
        (f"/chats/{chat}/messages?limit=ten", 400, "bad_request", "limit"),
        (f"/chats/{chat}/messages?limit=1.5", 400, "bad_request", "limit"),
        (f"/chats/{chat}/messages?limit=", 400, "bad_request", "limit"),
    ]
    for path, status, code, field in cases:
        assert_error(await call(server, "GET", path), status, code, field)
    assert (await call(server, "GET", f"/chats/{chat}/messages?limit=1000")).status == 200


# --------------------------------------------------------------------------- disconnect


async def test_disconnect_closes_every_socket_of_the_user_with_1008(
    start_server: StartServer,
) -> None:
    server = await start_api(start_server)
    async with (
        server.connect("alice") as alice,
        server.connect("bob") as bob,
        server.connect("alice") as alice_tablet,
        server.connect("alice") as alice_laptop,
    ):
        answer = await call(server, "POST", "/users/alice/disconnect")
        assert answer.status == 200
        assert answer.body == {"closed": 3}
        for client in (alice, alice_tablet, alice_laptop):
            assert await client.wait_closed() == 1008
        assert await bob.request({"type": "ping"}) == {"type": "pong"}

        async def nothing_left() -> bool:  # each connection counts once, while it closes too
            again = await call(server, "POST", "/users/alice/disconnect")
            return bool(again.body == {"closed": 0})

        await wait_until(nothing_left, 5)
    async with server.connect("alice") as back:  # nothing refuses a new binding
        assert await back.request({"type": "ping"}) == {"type": "pong"}
    assert (await call(server, "POST", "/users/nobody/disconnect")).body == {"closed": 0}
    bad = await call(server, "POST", "/users/%20alice/disconnect")
    assert_error(bad, 400, "bad_request", "user_id")
