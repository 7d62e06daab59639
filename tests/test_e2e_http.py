"""End to end: the HTTP endpoints, the browser client's files and caching, graceful shutdown."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final

import pytest
import trio
from conftest import StartServer
from support import RunningServer, backlog_messages, http_request

import handler.app
from handler.app import IMMUTABLE, NO_CACHE, build_assets
from handler.errors import StoreUnavailable

REPO_WEB: Final = Path(__file__).resolve().parent.parent / "web"


async def test_healthz(server: RunningServer) -> None:
    response = await http_request(server, "GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert response.headers["content-type"].startswith("application/json")


async def test_metrics_count_frames_errors_and_connections(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        await alice.send_raw("not json")
        assert (await alice.recv())["code"] == "bad_json"
        response = await http_request(server, "GET", "/metrics")
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.body.decode()
        samples = {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert samples["chat_connections"] == 1
        assert samples["chat_bound_users"] == 1
        assert samples['chat_frames_in_total{type="ping"}'] >= 1
        assert samples['chat_frames_in_total{type="invalid"}'] >= 1
        assert samples['chat_errors_total{code="bad_json"}'] >= 1
        assert any(name.startswith("chat_frames_out_total") for name in samples)
        assert "# TYPE chat_commit_seconds histogram" in text


async def test_dev_token_when_enabled(server: RunningServer) -> None:
    response = await http_request(
        server,
        "POST",
        "/auth/dev-token",
        json.dumps({"user_id": "alice"}).encode(),
        [("Content-Type", "application/json")],
    )
    assert response.status == 200
    token = response.json()["token"]
    async with server.connect("alice", token=token) as alice:
        assert await alice.request({"type": "ping"}) == {"type": "pong"}


async def test_dev_token_refuses_a_bad_user_id(server: RunningServer) -> None:
    for body in (b'{"user_id": " alice"}', b'{"user_id": 5}', b"[]", b"not json", b""):
        response = await http_request(server, "POST", "/auth/dev-token", body)
        assert response.status == 400, body


@pytest.mark.parametrize(
    "user_id",
    [
        "ali\u200bce",
        "\u202eecila",
        "alice\u2028INFO handler.ws open conn=forged",
        "ali\u2029ce",
        "\ufeffalice",
        "alice\u2066",
    ],
    ids=repr,
)
async def test_dev_token_refuses_invisible_characters(server: RunningServer, user_id: str) -> None:
    body = json.dumps({"user_id": user_id}).encode()
    response = await http_request(server, "POST", "/auth/dev-token", body)
    assert response.status == 400
    assert "token" not in response.json()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"user_id": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"user_id": "\\ud800"}',
        b'{"user_id": "alice"} trailing',
        b'{"user_id": "al\xffice"}',
        b'{"user_id": NaN}',
        b"{",
        b"null",
        b"{}",
    ],
    ids=["deep-array", "deep-value", "lone-surrogate", "trailing", "bad-utf8", "nan", "cut",
         "null", "no-user-id"],
)  # fmt: skip
async def test_dev_token_answers_400_to_any_malformed_body(
    server: RunningServer, body: bytes
) -> None:
    """Never a 500 (a 100,000-deep array used to be a RecursionError with a traceback)."""
    response = await http_request(server, "POST", "/auth/dev-token", body, timeout=10)
    assert response.status == 400, response.body[:200]
    assert response.json()["error"] == "bad_request"
    ok = await http_request(server, "POST", "/auth/dev-token", b'{"user_id": "alice"}')
    assert ok.status == 200


async def test_dev_token_is_404_when_disabled(start_server: StartServer) -> None:
    server = await start_server(auth={"dev_tokens": False})
    response = await http_request(
        server, "POST", "/auth/dev-token", json.dumps({"user_id": "alice"}).encode()
    )
    assert response.status == 404
    assert "token" not in response.body.decode()


async def test_index_page(server: RunningServer) -> None:
    response = await http_request(server, "GET", "/")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    assert b'id="dev-form"' in response.body  # the real client, not a stub


def _versions(html: bytes) -> dict[str, str]:
    return dict(re.findall(r'(?:src|href)="([\w.-]+)\?v=([0-9a-f]+)"', html.decode()))


async def test_index_is_never_cached_and_names_versioned_assets(server: RunningServer) -> None:
    """Browsers must not keep old client code after an upgrade: index.html is revalidated
    every time, and the files it names carry their content hash in the URL."""
    index = await http_request(server, "GET", "/")
    assert index.headers["cache-control"] == NO_CACHE
    versions = _versions(index.body)
    assert set(versions) == {"app.js", "style.css"}
    for name, version in versions.items():
        pinned = await http_request(server, "GET", f"/{name}?v={version}")
        assert pinned.status == 200
        assert pinned.headers["cache-control"] == IMMUTABLE
        assert pinned.headers["etag"] == f'"{version}"'
        assert "max-age=43200" not in pinned.headers["cache-control"]
        # Without the current version (an old or hand-typed URL): revalidated, not kept.
        loose = await http_request(server, "GET", f"/{name}")
        assert loose.headers["cache-control"] == NO_CACHE
        stale = await http_request(server, "GET", f"/{name}?v=0000")
        assert stale.headers["cache-control"] == NO_CACHE
    app_js = await http_request(server, "GET", f"/app.js?v={versions['app.js']}")
    assert app_js.headers["content-type"].startswith("text/javascript")
    imported = re.search(rb'from "\./chat-client\.js\?v=([0-9a-f]+)"', app_js.body)
    assert imported is not None, "the module app.js imports is versioned too"
    module = await http_request(server, "GET", f"/chat-client.js?v={imported.group(1).decode()}")
    assert module.headers["cache-control"] == IMMUTABLE


async def test_revalidation_answers_304(server: RunningServer) -> None:
    index = await http_request(server, "GET", "/")
    again = await http_request(
        server, "GET", "/", headers=[("If-None-Match", index.headers["etag"])]
    )
    assert again.status == 304
    assert again.body == b""
    changed = await http_request(server, "GET", "/", headers=[("If-None-Match", '"other"')])
    assert changed.status == 200


async def test_unknown_files_are_404(server: RunningServer) -> None:
    for path in ("/nope.js", "/config.json", "/..%2Fconfig.json", "/.gitignore"):
        response = await http_request(server, "GET", path)
        assert response.status == 404, path


async def test_an_edited_client_file_gets_a_new_url_without_a_restart(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    web = tmp_path / "web"
    web.mkdir()
    for name in ("index.html", "app.js", "chat-client.js", "style.css"):
        (web / name).write_bytes((REPO_WEB / name).read_bytes())
    monkeypatch.setattr(handler.app, "find_web_root", lambda: web)
    server = await start_server()
    before = _versions((await http_request(server, "GET", "/")).body)
    # Only the imported module changes: app.js's URL must change too, or a browser would
    # keep the cached app.js and with it the old module URL.
    (web / "chat-client.js").write_text((web / "chat-client.js").read_text() + "\n// edited\n")
    after = _versions((await http_request(server, "GET", "/")).body)
    assert after["app.js"] != before["app.js"]
    assert after["style.css"] == before["style.css"]


def test_asset_versions_follow_imports() -> None:
    files = {
        "index.html": b'<script type="module" src="a.js"></script><link href="./s.css">',
        "a.js": b'import { b } from "./b.js";\nimport("./c.js");\n// "b.js" in a comment',
        "b.js": b"export const b = 1;",
        "c.js": b'import "./a.js";',  # a cycle does not loop
        "s.css": b"body {}",
    }
    assets = build_assets(files)
    html = assets["index.html"].body.decode()
    assert f'src="a.js?v={assets["a.js"].version}"' in html
    assert f'href="s.css?v={assets["s.css"].version}"' in html
    a_js = assets["a.js"].body.decode()
    assert f'from "./b.js?v={assets["b.js"].version}"' in a_js
    assert f'import("./c.js?v={assets["c.js"].version}")' in a_js
    assert '"b.js" in a comment' in a_js
    changed = build_assets({**files, "b.js": b"export const b = 2;"})
    assert changed["a.js"].version != assets["a.js"].version
    assert changed["index.html"].version != assets["index.html"].version
    assert changed["s.css"].version == assets["s.css"].version


async def test_shutdown_closes_with_1001_and_keeps_acknowledged_messages(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        chat = await alice.create_chat("bob")
        assert (await bob.recv())["type"] == "new_chats"
        await bob.ws.aclose()  # bob goes offline: the next messages wait for him
        acks = [await alice.send_message(chat["chat_id"], "bob", f"m{i}") for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.stop)
            assert await alice.wait_closed() == 1001
    # A new server on the same database still has every acknowledged message.
    again = await start_server(storage={"path": str(server.config.storage.path)})
    async with again.connect("bob") as bob:
        got = [m["message_id"] for m in backlog_messages(bob.backlog)]
        assert got == [a["message_id"] for a in acks]


async def test_no_new_connections_during_shutdown(start_server: StartServer) -> None:
    server = await start_server()
    async with server.connect("alice") as alice, trio.open_nursery() as nursery:
        nursery.start_soon(server.stop)
        assert await alice.wait_closed() == 1001
    with trio.fail_after(5):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        except OSError:
            return  # refused: not accepting any more
        await stream.aclose()
        raise AssertionError("the server still accepts connections after shutdown")


async def test_healthz_is_503_when_the_store_does_not_answer(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = server.app.services
    assert services is not None

    async def broken() -> None:
        raise StoreUnavailable("database is gone")

    monkeypatch.setattr(services.store, "check", broken)
    response = await http_request(server, "GET", "/healthz")
    assert response.status == 503
    body = response.json()
    assert body["status"] != "ok"
    assert "store" in body
