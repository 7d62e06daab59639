"""Presence end to end on a real server (PROTOCOL.md, "Version 2", "Presence").

The grace period is shortened (`GRACE_S`) so the offline announcement comes quickly; the
board's own timing is checked with a fake clock in `test_presence_board`. The same tests run
on two nodes from `test_e2e_cluster`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import trio
from support import Client, Frame, RunningServer

GRACE_S = 0.3
PRESENCE_LIMITS: dict[str, Any] = {"presence_grace_s": GRACE_S}

StartServer = Callable[..., Awaitable[RunningServer]]


def watching(client: Client) -> Client:
    """A client that reads `presence` frames (the version 1 tests leave them aside)."""
    client.set_aside = client.set_aside - {"presence"}
    return client


async def start_watching(client: Client) -> list[Frame]:
    """What a client does once bound: read its contacts' presence (`fetch_presence`); from
    its answer on, every change reaches it live."""
    watching(client)
    return await fetch(client)


async def next_presence(client: Client, timeout: float = 5.0) -> Frame:
    frame = await client.recv_until("presence", timeout=timeout)
    assert "request_id" not in frame, frame
    [entry] = frame["data"]
    return dict(entry)


async def presence_becomes(client: Client, expected: Frame, timeout: float = 5.0) -> None:
    """Live `presence` frames until one is `expected` (on several nodes, an earlier change
    may still be on its way from another node)."""
    with trio.fail_after(timeout):
        while await next_presence(client, timeout) != expected:
            pass


async def fetch(client: Client, user_ids: list[str] | None = None) -> list[Frame]:
    request: dict[str, Any] = {"type": "fetch_presence", "request_id": "p"}
    if user_ids is not None:
        request["user_ids"] = user_ids
    await client.send(request)
    frame = await client.recv_aside(
        lambda f: f.get("request_id") == "p" and f["type"] in ("presence", "error")
    )
    assert frame["type"] == "presence", frame
    return list(frame["data"])


async def fetch_eventually(
    client: Client, user_ids: list[str] | None, expected: Callable[[list[Frame]], bool]
) -> list[Frame]:
    """`fetch_presence` until its answer is as `expected`: on several nodes a change takes a
    moment (one batch, one pub/sub hop) to reach the other nodes' boards."""
    with trio.fail_after(3.0):
        while True:
            entries = await fetch(client, user_ids)
            if expected(entries):
                return entries
            await trio.sleep(0.05)


def online_is(*states: tuple[str, bool]) -> Callable[[list[Frame]], bool]:
    return lambda entries: [(e["user_id"], e["online"]) for e in entries] == list(states)


def parse(timestamp: str) -> datetime:
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def presence_frames(client: Client, seconds: float) -> list[Frame]:
    """Every live `presence` frame that arrives within `seconds`."""
    frames: list[Frame] = []
    with trio.move_on_after(seconds):
        while True:
            frames.append(await next_presence(client, timeout=seconds + 1))
    return frames


async def test_a_contact_coming_online_and_going_offline_after_the_grace(
    start_server: StartServer,
) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    async with server.connect("alice") as alice:
        watching(alice)
        async with server.connect("bob") as bob:
            await bob.create_chat("alice")
        # bob was online while he made the chat (so briefly that another node may not have
        # heard of it): once the grace is over he is offline.
        await fetch_eventually(alice, ["bob"], online_is(("bob", False)))
        await trio.sleep(GRACE_S + 0.2)
        alice.aside.clear()
        async with server.connect("bob"):
            assert await next_presence(alice) == {
                "user_id": "bob",
                "online": True,
                "last_seen": None,
            }
            await fetch_eventually(alice, ["bob"], online_is(("bob", True)))
        closed = datetime.now(UTC)
        started = trio.current_time()
        offline = await next_presence(alice)
        waited = trio.current_time() - started
        assert offline["user_id"] == "bob"
        assert offline["online"] is False
        assert abs((parse(offline["last_seen"]) - closed).total_seconds()) < 1.0
        assert GRACE_S * 0.8 <= waited < GRACE_S + 2.0
        [entry] = await fetch(alice, ["bob"])
        assert entry == offline


async def test_a_quick_reconnect_does_not_flicker(start_server: StartServer) -> None:
    server = await start_server(limits={"presence_grace_s": 2.0})
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        await bob.create_chat("alice")
        watching(alice)
        await alice.sync()
        for _ in range(3):
            async with server.connect("bob"):
                pass
        await bob.sync()
    async with server.connect("alice") as alice, server.connect("bob"):
        watching(alice)
        async with server.connect("bob"):
            pass
        assert await presence_frames(alice, 0.5) == []


async def test_every_device_of_a_contact_is_told_and_nobody_else(
    start_server: StartServer,
) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    async with server.connect("bob") as bob:
        await bob.create_chat("alice")
    await trio.sleep(GRACE_S + 0.3)  # bob is offline
    async with (
        server.connect("alice") as phone,
        server.connect("alice") as laptop,
        server.connect("carol") as carol,
    ):
        for client in (phone, laptop, carol):
            await start_watching(client)
        async with server.connect("bob"):
            for device in (phone, laptop):
                assert (await next_presence(device))["online"] is True
        for device in (phone, laptop):
            assert (await next_presence(device))["online"] is False
        assert await presence_frames(carol, 0.2) == []


async def test_fetch_presence_tells_nothing_about_strangers(start_server: StartServer) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    async with server.connect("bob") as bob:
        await bob.create_chat("alice")
    await trio.sleep(GRACE_S + 0.5)  # bob is offline, with a last_seen
    async with server.connect("alice") as alice, server.connect("stranger"):
        entries = await fetch(alice, ["bob", "stranger", "nobody", "alice"])
        assert [e["user_id"] for e in entries] == ["bob", "stranger", "nobody", "alice"]
        bob_entry, stranger, nobody, me = entries
        assert bob_entry["online"] is False
        assert bob_entry["last_seen"] is not None
        # Online, but not a contact: indistinguishable from a user who never existed.
        assert stranger == {"user_id": "stranger", "online": False, "last_seen": None}
        assert nobody == {"user_id": "nobody", "online": False, "last_seen": None}
        assert me == {"user_id": "alice", "online": True, "last_seen": None}


async def test_fetch_presence_without_ids_lists_contacts_most_recent_first(
    start_server: StartServer,
) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    for name in ("old", "newer"):
        async with server.connect(name) as contact:
            await contact.create_chat("alice")
        await trio.sleep(GRACE_S + 0.3)
    async with server.connect("alice") as alice, server.connect("online") as online:
        await online.create_chat("alice")
        entries = await fetch_eventually(
            alice, None, online_is(("online", True), ("newer", False), ("old", False))
        )
    assert parse(entries[1]["last_seen"]) > parse(entries[2]["last_seen"])


async def test_last_seen_survives_a_restart(start_server: StartServer, tmp_path: Any) -> None:
    storage = {"backend": "sqlite", "path": str(tmp_path / "kept.db")}
    first = await start_server(limits=PRESENCE_LIMITS, storage=storage)
    async with first.connect("bob") as bob:
        await bob.create_chat("alice")
    await trio.sleep(GRACE_S + 0.5)
    async with first.connect("alice") as alice:
        [before] = await fetch(alice, ["bob"])
    await first.stop()
    second = await start_server(limits=PRESENCE_LIMITS, storage=storage)
    async with second.connect("alice") as alice:
        [after] = await fetch(alice, ["bob"])
    assert before["last_seen"] is not None
    assert after == before


async def test_a_new_chat_makes_a_contact_at_once(start_server: StartServer) -> None:
    server = await start_server(limits=PRESENCE_LIMITS)
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        watching(alice)
        assert await fetch(alice, ["bob"]) == [
            {"user_id": "bob", "online": False, "last_seen": None}
        ]
        await bob.create_chat("alice")
        await alice.recv_until("new_chats")
        await fetch_eventually(alice, ["bob"], online_is(("bob", True)))
    await trio.sleep(GRACE_S + 0.3)
    async with server.connect("alice") as alice:
        await start_watching(alice)
        async with server.connect("bob"):
            assert (await next_presence(alice))["online"] is True


async def test_presence_off_tells_nothing(start_server: StartServer) -> None:
    server = await start_server(limits={"presence": False, "presence_grace_s": GRACE_S})
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        watching(alice)
        await bob.create_chat("alice")
        async with server.connect("carol") as carol:
            await carol.create_chat("alice")
        assert await fetch(alice, ["bob", "carol"]) == [
            {"user_id": "bob", "online": False, "last_seen": None},
            {"user_id": "carol", "online": False, "last_seen": None},
        ]
        assert await fetch(alice) == []
        assert await presence_frames(alice, GRACE_S + 0.3) == []


async def test_fetch_presence_validation(server: RunningServer) -> None:
    async with server.connect("alice") as alice:
        cases: list[Any] = [
            [],
            [f"user{i}" for i in range(201)],
            ["bob", "bob"],
            "bob",
            [7],
            [""],
        ]
        for user_ids in cases:
            reply = await alice.request(
                {"type": "fetch_presence", "user_ids": user_ids, "request_id": 1}
            )
            assert reply["type"] == "error", (user_ids, reply)
            assert (reply["code"], reply["field"]) == ("bad_request", "user_ids"), reply
        entries = await fetch(alice, [f"user{i}" for i in range(200)])
        assert len(entries) == 200


async def test_last_seen_is_kept_when_the_server_stops_within_the_grace(
    start_server: StartServer, tmp_path: Any
) -> None:
    storage = {"backend": "sqlite", "path": str(tmp_path / "stopped.db")}
    first = await start_server(limits={"presence_grace_s": 30}, storage=storage)
    async with first.connect("bob") as bob:
        await bob.create_chat("alice")
    closed = datetime.now(UTC)
    await first.stop()  # bob is still within his grace: the stop writes his last_seen
    second = await start_server(limits=PRESENCE_LIMITS, storage=storage)
    async with second.connect("alice") as alice:
        [entry] = await fetch(alice, ["bob"])
    assert entry["online"] is False
    assert entry["last_seen"] is not None
    assert abs((parse(entry["last_seen"]) - closed).total_seconds()) < 1.0
