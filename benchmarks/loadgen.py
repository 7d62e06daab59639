"""The load generator: one process, pinned to its own core, speaking PROTOCOL.md.

`python -m benchmarks.loadgen` reads one job (JSON) from its first stdin line and prints JSON
lines on stdout. At each measuring point it prints `{"checkpoint": name, ...}` and waits for
one line back, so the orchestrator reads server CPU time and RSS at exactly that moment while
the load keeps running. The last line is `{"result": {...}}`. Logs go to stderr.

Jobs (one per workload shape; the scenarios in `benchmarks.scenarios` pick sizes):

- `relay`: closed loop. Pairs of users, each keeping `window` `send_message` unacknowledged
  (the sender's own `message` copy is the acknowledgement). Saturates the server.
- `open_loop`: each user sends at Poisson times at a fixed total rate; latency counts from the
  *intended* send time, so a stalled server cannot hide its stalls (no coordinated omission).
- `idle`: bind many connections and hold them, with checkpoints at given counts.
- `connect`: connect + bind as fast as `concurrency` parallel clients allow.
- `backlog`: one user binds and receives everything not yet delivered to them.
- `fetch`: one user sends `fetch_chats` and receives every chat with its history.
- `group`: one group of `members` users, `senders` of them each sending at a fixed rate;
  every copy of every message is counted per member (latency, duplicates, missing).
- `presence`: users of a contact ring reconnect at a fixed rate (some stay away past the
  grace); live `presence` frames are counted and classified, apart from `fetch_presence`
  answers.
- `seed`: send messages through the server (when the store cannot be seeded directly);
  `seed_contacts` the same for the contact ring of `presence`.

Message contents start with the send time (`trio.current_time()`, same process for sender and
recipient), so any copy of a message carries its own latency.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import json
import math
import os
import random
import sys
import time
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import orjson
import trio

from benchmarks import wire
from benchmarks.servers import apply_priority, raise_nofile, usable_cpus

_TS_LEN: Final = 17
_SETUP_TIMEOUT: Final = 120.0


def make_content(sent_at: float, size: int) -> str:
    """A message body of `size` characters that starts with its send time."""
    stamp = f"{sent_at:0{_TS_LEN}.6f}"
    return stamp + " " + "x" * max(0, size - _TS_LEN - 1)


def sent_at(content: str) -> float:
    return float(content[:_TS_LEN])


class Checkpoints:
    """The stdout/stdin handshake with the orchestrator (see module doc)."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive

    async def __call__(self, name: str, **info: Any) -> None:
        emit({"checkpoint": name, **info})
        if self.interactive:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                raise SystemExit("orchestrator went away")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(text: str) -> None:
    print(f"[loadgen] {text}", file=sys.stderr, flush=True)


def percentiles(samples: array[float] | list[float]) -> dict[str, float | int]:
    """p50/p90/p99/p99.9/max in milliseconds, plus the count."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)
    count = len(ordered)

    def pick(q: float) -> float:
        return ordered[min(count - 1, max(0, math.ceil(q * count) - 1))] * 1000

    return {
        "count": count,
        "p50_ms": pick(0.50),
        "p90_ms": pick(0.90),
        "p99_ms": pick(0.99),
        "p999_ms": pick(0.999),
        "max_ms": ordered[-1] * 1000,
        "mean_ms": sum(ordered) / count * 1000,
    }


def histogram(samples: array[float], bins: int = 120) -> dict[str, list[float]]:
    """Log-spaced histogram of latencies (ms) for the plots, small enough to keep in JSON."""
    if not samples:
        return {"edges_ms": [], "counts": []}
    low = max(min(samples) * 1000, 0.01)
    high = max(max(samples) * 1000, low * 1.01)
    ratio = (high / low) ** (1 / bins)
    edges = [low * ratio**i for i in range(bins + 1)]
    counts = [0.0] * bins
    log_low, log_ratio = math.log(low), math.log(ratio)
    for sample in samples:
        index = int((math.log(max(sample * 1000, low)) - log_low) / log_ratio)
        counts[min(bins - 1, max(0, index))] += 1
    return {"edges_ms": edges, "counts": counts}


class User:
    """One authenticated connection of the generator, with frames read but not yet used."""

    def __init__(self, user_id: str, conn: wire.RawConnection | wire.TrioWebsocketConnection):
        self.user_id = user_id
        self.conn = conn
        self.pending: list[dict[str, Any]] = []
        self.chat_id: str | None = None
        self.peer: str | None = None

    async def next_frame(self) -> dict[str, Any]:
        while not self.pending:
            self.pending.extend(orjson.loads(raw) for raw in await self.conn.receive_batch())
        return self.pending.pop(0)

    async def wait_for(self, kind: str) -> dict[str, Any]:
        """The next frame of this type; an `error` frame on the way fails the run."""
        while True:
            frame = await self.next_frame()
            if frame.get("type") == kind:
                return frame
            if frame.get("type") == "error":
                raise RuntimeError(
                    f"{self.user_id}: server error while waiting for {kind}: {frame}"
                )

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send_texts([orjson.dumps(frame)])


class Generator:
    """Shared state of one job: where the server is, how to connect, who we are."""

    def __init__(self, job: dict[str, Any], nursery: trio.Nursery) -> None:
        self.job = job
        self.nursery = nursery
        self.host: str = job.get("host", "127.0.0.1")
        self.port: int = job["port"]
        self.secret: str = job.get("secret", "benchmark")
        self.client: str = job.get("client", "raw")
        self.prefix: str = job.get("prefix", f"u{os.getpid()}-{random.randrange(10**6)}")
        # Many source addresses keep ephemeral ports plentiful for 10k+ connections.
        self.sources = [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(job.get("sources", 0))]
        self.checkpoint = Checkpoints(job.get("interactive", True))
        self.tokens: dict[str, str] = {}
        self._source_cycle = itertools.cycle(self.sources or [None])

    def user_id(self, index: int, role: str = "u") -> str:
        return f"{self.prefix}-{role}{index}"

    def premint(self, user_ids: list[str]) -> None:
        """Sign tokens ahead of a timed window: real clients arrive with theirs."""
        for user_id in user_ids:
            self.tokens[user_id] = wire.mint_token(user_id, self.secret)

    async def connect(self, user_id: str, *, with_token: bool = True) -> User:
        """Open a WebSocket with `?token=` and wait for `authenticated` (the bind)."""
        path = "/ws"
        if with_token:
            token = self.tokens.get(user_id) or wire.mint_token(user_id, self.secret)
            path += "?token=" + token
        source = next(self._source_cycle)
        conn = await wire.connect(
            self.client, self.nursery, self.host, self.port, path, local_address=source
        )
        user = User(user_id, conn)
        await user.wait_for("authenticated")
        return user

    async def connect_many(
        self, user_ids: list[str], concurrency: int, on_done: Callable[[User], None] | None = None
    ) -> list[User]:
        users: list[User | None] = [None] * len(user_ids)
        limiter = trio.CapacityLimiter(concurrency)

        async def one(index: int) -> None:
            async with limiter:
                users[index] = user = await self.connect(user_ids[index])
            if on_done:
                on_done(user)

        async with trio.open_nursery() as nursery:
            for index in range(len(user_ids)):
                nursery.start_soon(one, index)
        return [user for user in users if user is not None]

    async def make_pairs(self, pairs: int, concurrency: int = 64) -> list[tuple[User, User]]:
        """Bind 2 x `pairs` users and open one chat per pair; both sides learn the chat id."""
        ids = [self.user_id(i) for i in range(2 * pairs)]
        users = await self.connect_many(ids, concurrency)
        couples = [(users[2 * i], users[2 * i + 1]) for i in range(pairs)]
        limiter = trio.CapacityLimiter(concurrency)

        async def open_chat(a: User, b: User) -> None:
            async with limiter:
                await a.send({"type": "create_chat", "recipient_id": b.user_id, "request_id": 1})
                chat = (await a.wait_for("new_chats"))["data"][0]
                await b.wait_for("new_chats")
                a.chat_id = b.chat_id = chat["chat_id"]
                a.peer, b.peer = b.user_id, a.user_id

        async with trio.open_nursery() as nursery:
            for a, b in couples:
                nursery.start_soon(open_chat, a, b)
        return couples


async def close_all(users: list[User], *, polite: bool = True, concurrency: int = 200) -> None:
    """Close connections; `polite` runs the close handshake, else TCP is simply dropped."""
    limiter = trio.CapacityLimiter(concurrency)

    async def one(user: User) -> None:
        async with limiter:
            with contextlib.suppress(Exception):
                if polite:
                    await user.conn.aclose()
                else:
                    await user.conn.abort()

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(one, user)


class Tally:
    """Counters and latency samples of the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.sent = 0
        self.acks = 0
        self.delivered = 0
        self.ack_latency: array[float] = array("d")
        self.delivery_latency: array[float] = array("d")
        self.errors: Counter[str] = Counter()
        self.other: Counter[str] = Counter()


async def job_relay(gen: Generator) -> dict[str, Any]:
    """Closed loop: every user keeps `window` messages in flight to its peer."""
    job = gen.job
    window: int = job["window"]
    size: int = job.get("content_bytes", 100)
    started = trio.current_time()
    couples = await gen.make_pairs(job["pairs"])
    users = [u for couple in couples for u in couple]
    setup_s = trio.current_time() - started
    tally = Tally()
    sending = True

    def frame(user: User, now: float) -> bytes:
        return orjson.dumps(
            {
                "type": "send_message",
                "chat_id": user.chat_id,
                "recipient_id": user.peer,
                "content": make_content(now, size),
                "request_id": 1,
            }
        )

    async def run(user: User) -> None:
        inflight = 0
        me = user.user_id
        conn = user.conn
        while True:
            if sending and inflight < window:
                now = trio.current_time()
                batch = [frame(user, now)] * (window - inflight)
                try:
                    await conn.send_texts(batch)
                except wire.ConnectionClosed as closed:
                    tally.errors[f"closed:{closed.code}"] += 1
                    return
                if tally.measuring:
                    tally.sent += len(batch)
                inflight = window
            elif not sending and inflight <= 0:
                return
            try:
                received = await conn.receive_batch()
            except wire.ConnectionClosed as closed:
                tally.errors[f"closed:{closed.code}"] += 1
                return
            now = trio.current_time()
            for raw in received:
                message = orjson.loads(raw)
                kind = message.get("type")
                if kind == "message":
                    latency = now - sent_at(message["content"])
                    if message["sender_id"] == me:
                        inflight -= 1
                        if tally.measuring:
                            tally.acks += 1
                            tally.ack_latency.append(latency)
                    elif tally.measuring:
                        tally.delivered += 1
                        tally.delivery_latency.append(latency)
                elif kind == "error":
                    tally.errors[str(message.get("code"))] += 1
                    if message.get("request_id") is not None:
                        inflight -= 1
                else:
                    tally.other[str(kind)] += 1

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(run, user)
        await trio.sleep(job.get("warmup_s", 2.0))
        await gen.checkpoint("measure_start")
        tally.measuring = True
        cpu0, t0 = time.process_time(), trio.current_time()
        await trio.sleep(job["duration_s"])
        tally.measuring = False
        elapsed, gen_cpu = trio.current_time() - t0, time.process_time() - cpu0
        sending = False
        await gen.checkpoint("measure_end")
        nursery.cancel_scope.deadline = trio.current_time() + job.get("drain_s", 10.0)
    await close_all(users)
    return {
        "users": len(users),
        "setup_s": setup_s,
        "elapsed_s": elapsed,
        "sent": tally.sent,
        "acks": tally.acks,
        "delivered": tally.delivered,
        "delivered_per_s": tally.delivered / elapsed,
        "acks_per_s": tally.acks / elapsed,
        "generator_cpu_s": gen_cpu,
        "ack_latency": percentiles(tally.ack_latency),
        "delivery_latency": percentiles(tally.delivery_latency),
        "delivery_histogram": histogram(tally.delivery_latency),
        "errors": dict(tally.errors),
        "other_frames": dict(tally.other),
    }


async def job_open_loop(gen: Generator) -> dict[str, Any]:
    """Fixed offered load: Poisson sends at `rate` msg/s in total over all users."""
    job = gen.job
    size: int = job.get("content_bytes", 100)
    rate: float = job["rate"]
    couples = await gen.make_pairs(job["users"] // 2)
    users = [u for couple in couples for u in couple]
    per_user = rate / len(users)
    warmup: float = job.get("warmup_s", 2.0)
    duration: float = job["duration_s"]
    rng = random.Random(job.get("seed", 1))
    tally = Tally()
    window = [math.inf, math.inf]  # intended-send-time bounds of the measured window
    outstanding = {"acks": 0, "deliveries": 0}
    senders_done = False
    settled = trio.Event()

    def check_settled() -> None:
        if senders_done and outstanding["acks"] <= 0 and outstanding["deliveries"] <= 0:
            settled.set()

    begin = trio.current_time() + 0.2
    stop_at = begin + warmup + duration

    async def scheduler() -> None:
        """One task sends every user's messages from a merged Poisson schedule: a thousand
        sleeping tasks would add their own wake-up delays to the latency being measured."""
        heap = [(begin + rng.expovariate(per_user), index) for index in range(len(users))]
        heapq.heapify(heap)
        bases = [
            {"type": "send_message", "chat_id": u.chat_id, "recipient_id": u.peer} for u in users
        ]
        while heap and heap[0][0] < stop_at:
            await trio.sleep_until(heap[0][0])
            now = trio.current_time()
            while heap and heap[0][0] <= now and heap[0][0] < stop_at:
                due, index = heap[0]
                heapq.heapreplace(heap, (due + rng.expovariate(per_user), index))
                content = make_content(due, size)
                frame = orjson.dumps({**bases[index], "content": content, "request_id": 1})
                try:
                    await users[index].conn.send_texts([frame])
                except wire.ConnectionClosed:
                    tally.errors["send_failed"] += 1
                    continue
                if window[0] <= due < window[1]:
                    tally.sent += 1
                    outstanding["acks"] += 1
                    outstanding["deliveries"] += 1
                    send_lag.append(trio.current_time() - due)

    timeline: dict[int, list[float]] = {}  # second of the window -> [count, max latency]
    # How late the generator itself wrote each frame: if this grows, the generator (or its
    # core) is the bottleneck, not the server.
    send_lag: array[float] = array("d")

    async def reader(user: User) -> None:
        me = user.user_id
        while True:
            try:
                received = await user.conn.receive_batch()
            except wire.ConnectionClosed as closed:
                tally.errors[f"closed:{closed.code}"] += 1
                return
            now = trio.current_time()
            for raw in received:
                message = orjson.loads(raw)
                kind = message.get("type")
                if kind == "message":
                    due = sent_at(message["content"])
                    if not window[0] <= due < window[1]:
                        continue
                    if message["sender_id"] == me:
                        tally.acks += 1
                        outstanding["acks"] -= 1
                        tally.ack_latency.append(now - due)
                    else:
                        tally.delivered += 1
                        outstanding["deliveries"] -= 1
                        tally.delivery_latency.append(now - due)
                        second = timeline.setdefault(int(due - window[0]), [0, 0.0])
                        second[0] += 1
                        second[1] = max(second[1], now - due)
                    check_settled()
                elif kind == "error":
                    tally.errors[str(message.get("code"))] += 1
                else:
                    tally.other[str(kind)] += 1

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(reader, user)
        async with trio.open_nursery() as senders:
            senders.start_soon(scheduler)
            await trio.sleep_until(begin + warmup)
            await gen.checkpoint("measure_start")
            window[:] = [trio.current_time(), begin + warmup + duration]
            cpu0 = time.process_time()
            await trio.sleep_until(window[1])
            gen_cpu = time.process_time() - cpu0
            await gen.checkpoint("measure_end")
        with trio.move_on_after(job.get("drain_s", 10.0)):
            senders_done = True
            check_settled()
            await settled.wait()
        nursery.cancel_scope.cancel()
    await close_all(users)
    elapsed = window[1] - window[0]
    return {
        "users": len(users),
        "offered_per_s": rate,
        "elapsed_s": elapsed,
        "sent": tally.sent,
        "sent_per_s": tally.sent / elapsed,
        "delivered": tally.delivered,
        "delivered_per_s": tally.delivered / elapsed,
        "lost": max(0, outstanding["deliveries"]),
        "generator_cpu_s": gen_cpu,
        "ack_latency": percentiles(tally.ack_latency),
        "delivery_latency": percentiles(tally.delivery_latency),
        "delivery_histogram": histogram(tally.delivery_latency),
        "send_lag": percentiles(send_lag),
        "timeline": [
            {"second": second, "delivered": count, "max_ms": worst * 1000}
            for second, (count, worst) in sorted(timeline.items())
        ],
        "errors": dict(tally.errors),
        "other_frames": dict(tally.other),
    }


def group_content(due: float, tag: str, size: int) -> str:
    """A message body of `size` characters: its send time, then its tag, then padding."""
    head = f"{due:0{_TS_LEN}.6f} {tag} "
    return head + "x" * max(0, size - len(head))


def group_tag(content: str) -> str:
    return content[_TS_LEN + 1 :].split(" ", 1)[0]


async def make_group(gen: Generator, members: int) -> tuple[list[User], str]:
    """Bind `members` users; the first creates one group of all of them (one `create_group`,
    before any window), and every member waits for its `new_chats`."""
    ids = [gen.user_id(i, "g") for i in range(members)]
    with trio.fail_after(_SETUP_TIMEOUT):
        users = await gen.connect_many(ids, 50)
        if len(users) != members:
            raise RuntimeError(f"only {len(users)} of {members} members bound")
        creator = users[0]
        await creator.send(
            {
                "type": "create_group",
                "title": "benchmark group",
                "member_ids": ids[1:],
                "request_id": "group",
            }
        )
        reply = await creator.wait_for("new_chats")
        [chat] = reply["data"]
        if sorted(chat.get("participants", [])) != sorted(ids):
            raise RuntimeError(f"the group has {len(chat.get('participants', []))} members")
        chat_id: str = chat["chat_id"]

        async def joined(user: User) -> None:
            while True:
                frame = await user.wait_for("new_chats")
                if any(c["chat_id"] == chat_id for c in frame["data"]):
                    return

        async with trio.open_nursery() as nursery:
            for user in users[1:]:
                nursery.start_soon(joined, user)
    return users, chat_id


async def job_group(gen: Generator) -> dict[str, Any]:
    """Group fan-out: `senders` members each send `rate_per_sender` msg/s, open loop at fixed
    intervals (random phases), into one group of `members`; latency from the intended send
    time, as in `open_loop`. Every member must get each message exactly once (the sender's
    own copy is its acknowledgement); `receipt` frames are read and counted, nothing more."""
    job = gen.job
    members: int = job["members"]
    size: int = job.get("content_bytes", 100)
    period = 1.0 / job.get("rate_per_sender", 1.0)
    warmup: float = job.get("warmup_s", 2.0)
    duration: float = job["duration_s"]
    rng = random.Random(job.get("seed", 1))
    started = trio.current_time()
    users, chat_id = await make_group(gen, members)
    setup_s = trio.current_time() - started
    senders = users[: job["senders"]]
    index_of = {user.user_id: index for index, user in enumerate(users)}
    tally = Tally()
    window = [math.inf, math.inf]  # intended-send-time bounds of the measured window
    # tag -> copies received per member index, for every message sent in the window
    copies: dict[str, bytearray] = {}
    counts = {"outstanding": 0, "duplicates": 0, "foreign": 0}
    send_lag: array[float] = array("d")
    timeline: dict[int, list[float]] = {}
    senders_done = False
    settled = trio.Event()

    def check_settled() -> None:
        if senders_done and counts["outstanding"] <= 0:
            settled.set()

    begin = trio.current_time() + 0.2
    stop_at = begin + warmup + duration

    async def scheduler() -> None:
        """One task sends for every sender, from a merged schedule (see `open_loop`)."""
        heap = [(begin + rng.random() * period, index) for index in range(len(senders))]
        heapq.heapify(heap)
        sequence = [0] * len(senders)
        while heap and heap[0][0] < stop_at:
            await trio.sleep_until(heap[0][0])
            now = trio.current_time()
            while heap and heap[0][0] <= now and heap[0][0] < stop_at:
                due, index = heap[0]
                heapq.heapreplace(heap, (due + period, index))
                tag = f"{index}:{sequence[index]}"
                sequence[index] += 1
                measured = window[0] <= due < window[1]
                if measured:
                    copies[tag] = bytearray(members)
                    counts["outstanding"] += members
                frame = orjson.dumps(
                    {
                        "type": "send_message",
                        "chat_id": chat_id,
                        "content": group_content(due, tag, size),
                        "request_id": 1,
                    }
                )
                try:
                    await senders[index].conn.send_texts([frame])
                except wire.ConnectionClosed:
                    tally.errors["send_failed"] += 1
                    if measured:
                        del copies[tag]
                        counts["outstanding"] -= members
                    continue
                if measured:
                    tally.sent += 1
                    send_lag.append(trio.current_time() - due)

    async def reader(user: User) -> None:
        me = index_of[user.user_id]
        while True:
            try:
                received = await user.conn.receive_batch()
            except wire.ConnectionClosed as closed:
                tally.errors[f"closed:{closed.code}"] += 1
                return
            now = trio.current_time()
            for raw in received:
                message = orjson.loads(raw)
                kind = message.get("type")
                if kind == "message":
                    content = message["content"]
                    got = copies.get(group_tag(content))
                    if got is None:
                        continue  # warm-up, or after the window
                    if message.get("chat_id") != chat_id:
                        counts["foreign"] += 1
                        continue
                    got[me] = min(255, got[me] + 1)
                    if got[me] > 1:
                        counts["duplicates"] += 1
                        continue
                    counts["outstanding"] -= 1
                    due = sent_at(content)
                    latency = now - due
                    if message.get("sender_id") == user.user_id:
                        tally.acks += 1
                        tally.ack_latency.append(latency)
                    else:
                        tally.delivered += 1
                        tally.delivery_latency.append(latency)
                        second = timeline.setdefault(int(due - window[0]), [0, 0.0])
                        second[0] += 1
                        second[1] = max(second[1], latency)
                    check_settled()
                elif kind == "error":
                    tally.errors[str(message.get("code"))] += 1
                elif kind == "receipt":
                    tally.other[f"receipt:{message.get('kind')}"] += 1
                else:
                    tally.other[str(kind)] += 1

    async with trio.open_nursery() as nursery:
        for user in users:
            nursery.start_soon(reader, user)
        async with trio.open_nursery() as sending:
            sending.start_soon(scheduler)
            await trio.sleep_until(begin + warmup)
            await gen.checkpoint("measure_start")
            window[:] = [trio.current_time(), stop_at]
            cpu0 = time.process_time()
            await trio.sleep_until(window[1])
            gen_cpu = time.process_time() - cpu0
            await gen.checkpoint("measure_end")
        with trio.move_on_after(job.get("drain_s", 10.0)):
            senders_done = True
            check_settled()
            await settled.wait()
        # Late duplicates would come after the last first copy: keep reading a moment.
        await trio.sleep(job.get("duplicate_grace_s", 0.5))
        nursery.cancel_scope.cancel()
    await close_all(users)
    elapsed = window[1] - window[0]
    missing = sum(got.count(0) for got in copies.values())
    return {
        "members": members,
        "senders": len(senders),
        "setup_s": setup_s,
        "elapsed_s": elapsed,
        "sent": tally.sent,
        "sent_per_s": tally.sent / elapsed,
        "expected_copies": tally.sent * members,
        "delivered": tally.delivered,
        "delivered_per_s": tally.delivered / elapsed,
        "acks": tally.acks,
        "duplicates": counts["duplicates"],
        "missing": missing,
        "foreign": counts["foreign"],
        "generator_cpu_s": gen_cpu,
        "ack_latency": percentiles(tally.ack_latency),
        "delivery_latency": percentiles(tally.delivery_latency),
        "delivery_histogram": histogram(tally.delivery_latency),
        "send_lag": percentiles(send_lag),
        "timeline": [
            {"second": second, "delivered": count, "max_ms": worst * 1000}
            for second, (count, worst) in sorted(timeline.items())
        ],
        "errors": dict(tally.errors),
        "other_frames": dict(tally.other),
    }


async def _drain(user: User) -> None:
    """Keep reading (answers server pings) until the connection ends."""
    with contextlib.suppress(wire.ConnectionClosed):
        while True:
            await user.conn.receive_batch()


async def job_idle(gen: Generator) -> dict[str, Any]:
    """Hold bound, silent connections; checkpoint at each count in `steps`."""
    job = gen.job
    concurrency: int = job.get("concurrency", 100)
    warm = await gen.connect_many([gen.user_id(i, "w") for i in range(job.get("warmup", 20))], 20)
    await close_all(warm)
    await trio.sleep(0.5)
    await gen.checkpoint("held_0", connections=0)
    users: list[User] = []
    steps_out = []
    async with trio.open_nursery() as nursery:

        def hold(user: User) -> None:
            nursery.start_soon(_drain, user)

        for step in job["steps"]:
            t0 = trio.current_time()
            ids = [gen.user_id(i) for i in range(len(users), step)]
            gen.premint(ids)
            users += await gen.connect_many(ids, concurrency, hold)
            connect_s = trio.current_time() - t0
            await trio.sleep(job.get("settle_s", 1.0))
            await gen.checkpoint(f"held_{step}", connections=len(users))
            steps_out.append({"target": step, "connections": len(users), "connect_s": connect_s})
        nursery.cancel_scope.cancel()
    await close_all(users, polite=False)
    return {"steps": steps_out}


async def job_connect(gen: Generator) -> dict[str, Any]:
    """Connect + bind `count` fresh users with `concurrency` clients at a time.

    With `reconnect`, a reconnect storm instead: the same users, with the same tokens, were
    bound once and their connections dropped (as in a network blip) before the measured
    round, so the server has seen them and their tokens already.
    """
    job = gen.job
    count: int = job["count"]
    latencies: array[float] = array("d")
    users: list[User] = []
    errors: Counter[str] = Counter()
    limiter = trio.CapacityLimiter(job.get("concurrency", 50))
    ids = [gen.user_id(i) for i in range(count)]
    gen.premint(ids)
    if job.get("reconnect"):
        earlier: list[User] = []

        async def first(user_id: str) -> None:
            async with limiter:
                with contextlib.suppress(
                    OSError, trio.BrokenResourceError, wire.HandshakeError, wire.ConnectionClosed
                ):
                    earlier.append(await gen.connect(user_id))

        async with trio.open_nursery() as nursery:
            for user_id in ids:
                nursery.start_soon(first, user_id)
        await close_all(earlier, polite=False)
    await gen.checkpoint("measure_start")
    t0 = trio.current_time()
    cpu0 = time.process_time()
    async with trio.open_nursery() as holder:

        async def one(user_id: str) -> None:
            async with limiter:
                start = trio.current_time()
                try:
                    user = await gen.connect(user_id)
                except (
                    OSError,
                    trio.BrokenResourceError,
                    wire.HandshakeError,
                    wire.ConnectionClosed,
                ) as error:
                    errors[type(error).__name__] += 1
                    return
                latencies.append(trio.current_time() - start)
                users.append(user)
                holder.start_soon(_drain, user)

        async with trio.open_nursery() as nursery:
            for user_id in ids:
                nursery.start_soon(one, user_id)
        elapsed = trio.current_time() - t0
        gen_cpu = time.process_time() - cpu0
        await gen.checkpoint("measure_end")
        holder.cancel_scope.cancel()
    await close_all(users, polite=False)
    return {
        "count": count,
        "bound": len(latencies),
        "elapsed_s": elapsed,
        "connects_per_s": len(latencies) / elapsed,
        "generator_cpu_s": gen_cpu,
        "latency": percentiles(latencies),
        "errors": dict(errors),
    }


async def job_backlog(gen: Generator) -> dict[str, Any]:
    """One user binds and receives `expect_messages` undelivered messages."""
    job = gen.job
    expect: int = job["expect_messages"]
    gen.premint([job["user_id"]])
    await gen.checkpoint("measure_start")
    t0 = trio.current_time()
    user = await gen.connect(job["user_id"])
    t_bound = trio.current_time()
    chats = messages = frames = 0
    first_message: float | None = None
    with trio.fail_after(job.get("timeout_s", 300.0)):
        while messages < expect:
            frame = await user.next_frame()
            frames += 1
            kind = frame.get("type")
            if kind == "new_chats":
                chats += len(frame["data"])
            elif kind == "new_messages":
                messages += len(frame["data"])
                if first_message is None:
                    first_message = trio.current_time()
            elif kind == "error":
                raise RuntimeError(f"server error: {frame}")
    elapsed = trio.current_time() - t0
    await gen.checkpoint("measure_end")
    received = user.conn.bytes_received
    await close_all([user])
    return {
        "messages": messages,
        "chats": chats,
        "frames": frames,
        "elapsed_s": elapsed,
        "bind_s": t_bound - t0,
        "first_message_s": (first_message or t0) - t0,
        "messages_per_s": messages / elapsed,
        "bytes": received,
    }


async def job_fetch(gen: Generator) -> dict[str, Any]:
    """`fetch_chats` for one user, `repeats` times on the same connection; with `limit` 0
    only the chat list (`all_chats`) comes back."""
    job = gen.job
    limit = job.get("limit")
    user = await gen.connect(job["user_id"])
    await trio.sleep(job.get("settle_s", 0.2))
    user.pending.clear()
    rounds = []
    for index in range(job.get("repeats", 2)):
        before = user.conn.bytes_received
        await gen.checkpoint(f"fetch_{index}_start")
        t0 = trio.current_time()
        request: dict[str, Any] = {"type": "fetch_chats", "request_id": index}
        if limit is not None:
            request["limit"] = limit
        await user.send(request)
        listing = await user.wait_for("all_chats")
        chats = len(listing["data"])
        messages = 0
        with trio.fail_after(job.get("timeout_s", 300.0)):
            for _ in range(chats if limit != 0 else 0):
                page = await user.wait_for("all_messages")
                messages += len(page["data"])
        elapsed = trio.current_time() - t0
        await gen.checkpoint(f"fetch_{index}_end")
        rounds.append(
            {
                "chats": chats,
                "messages": messages,
                "elapsed_s": elapsed,
                "bytes": user.conn.bytes_received - before,
            }
        )
    await close_all([user])
    return {"rounds": rounds}


async def _pump(user: User, targets: list[tuple[str, str]], per_chat: int, size: int) -> None:
    """Send `per_chat` messages to each (chat, recipient), `window` in flight, round robin."""
    order = [target for _ in range(per_chat) for target in targets]
    window = 64
    sent = acked = 0
    while acked < len(order):
        if sent < len(order) and sent - acked < window:
            count = min(window - (sent - acked), len(order) - sent)
            frames = [
                orjson.dumps(
                    {
                        "type": "send_message",
                        "chat_id": chat_id,
                        "recipient_id": recipient,
                        "content": make_content(0.0, size),
                    }
                )
                for chat_id, recipient in order[sent : sent + count]
            ]
            await user.conn.send_texts(frames)
            sent += count
        for raw in await user.conn.receive_batch():
            frame = orjson.loads(raw)
            if frame.get("type") == "message" and frame.get("sender_id") == user.user_id:
                acked += 1
            elif frame.get("type") == "error":
                raise RuntimeError(f"seeding failed: {frame}")


async def job_seed(gen: Generator) -> dict[str, Any]:
    """Create chats between `owner` and peers and send messages through the server.

    `sender` is "peer" (the owner stays offline: everything lands in their backlog) or
    "owner" (the owner's own messages, delivered to them by definition; peers stay offline).
    """
    job = gen.job
    owner_id: str = job["owner"]
    chats: int = job["chats"]
    per_chat: int = job["messages_per_chat"]
    size: int = job.get("content_bytes", 100)
    peer_ids = [f"{owner_id}-peer{i}" for i in range(chats)]
    t0 = trio.current_time()
    if job["sender"] == "owner":
        owner = await gen.connect(owner_id)
        targets = []
        for peer_id in peer_ids:
            await owner.send({"type": "create_chat", "recipient_id": peer_id})
            targets.append(((await owner.wait_for("new_chats"))["data"][0]["chat_id"], peer_id))
        await _pump(owner, targets, per_chat, size)
        users = [owner]
    else:
        users = await gen.connect_many(peer_ids, 50)

        async def fill(peer: User) -> None:
            await peer.send({"type": "create_chat", "recipient_id": owner_id})
            chat_id = (await peer.wait_for("new_chats"))["data"][0]["chat_id"]
            await _pump(peer, [(chat_id, owner_id)], per_chat, size)

        limiter = trio.CapacityLimiter(16)

        async def limited(peer: User) -> None:
            async with limiter:
                await fill(peer)

        async with trio.open_nursery() as nursery:
            for peer in users:
                nursery.start_soon(limited, peer)
    elapsed = trio.current_time() - t0
    await close_all(users)
    return {"chats": chats, "messages": chats * per_chat, "elapsed_s": elapsed}


def contact_user(prefix: str, index: int) -> str:
    """The id of user `index` of a contact graph (`benchmarks.seed` writes the same ids)."""
    return f"{prefix}-c{index}"


def ring_contacts(users: int, contacts: int) -> list[tuple[int, int]]:
    """The direct chats of a ring in which every user shares one with the `contacts` nearest
    users, half on either side, so that each has exactly `contacts` contacts: one pair per
    chat, lower position first."""
    if contacts % 2 or not 0 < contacts < users:
        raise ValueError(f"{contacts} contacts each need an even number below {users} users")
    return [
        (index, (index + step) % users)
        for index in range(users)
        for step in range(1, contacts // 2 + 1)
    ]


def contacts_of(users: int, contacts: int) -> list[list[int]]:
    """Each user's contacts in `ring_contacts`."""
    half = contacts // 2
    return [
        [(index + step) % users for step in range(-half, half + 1) if step]
        for index in range(users)
    ]


class _Member:
    """One user of the `presence` job: its current connection, and what that connection has
    been told about its contacts' presence."""

    __slots__ = (
        "back_at",
        "busy",
        "contacts",
        "departed",
        "fetch_sent",
        "gone_at",
        "reader_done",
        "scope",
        "user",
        "user_id",
        "view",
    )

    def __init__(self, user_id: str, contacts: frozenset[str]) -> None:
        self.user_id = user_id
        self.contacts = contacts
        self.user: User | None = None
        self.scope: trio.CancelScope | None = None
        self.reader_done = trio.Event()
        self.busy = False  # a reconnect (or an absence) is under way
        # Its last gap without a connection: from the start of its close to its next
        # `authenticated` (None while the gap lasts), a little longer than the server's view.
        self.gone_at: float | None = None
        self.back_at: float | None = None
        self.departed = False  # that gap was a departure (away past the grace)
        self.fetch_sent = 0.0
        self.view: dict[str, bool] = {}  # contact -> online, as this connection was told

    def gap(self, now: float) -> float | None:
        """How long its last gap lasted (so far, while it lasts); None if it had none."""
        if self.gone_at is None:
            return None
        return (now if self.back_at is None else self.back_at) - self.gone_at


# How long after a user comes back from a gap longer than the grace an `online`
# announcement of it counts as the announcement of its return (later ones are redundant).
_RETURN_WINDOW_S: Final = 5.0


async def job_presence(gen: Generator) -> dict[str, Any]:
    """Presence under reconnect churn. `users` users of a contact ring (`ring_contacts`,
    seeded before the server starts) bind, each sending `fetch_presence` after
    `authenticated` as a real client does. Then `reconnect_per_s` of them per second, at
    fixed intervals in a shuffled round robin, close their connection (politely, waiting for
    the server's close) and at once connect and bind again, then fetch presence again.

    With `away_per_s`, that many of those reconnects per second are departures instead: the
    user stays away `away_s` (longer than the server's grace `grace_s`) before coming back,
    so its contacts should see it go offline and come back online.

    Live `presence` frames (no `request_id`) are counted apart from `fetch_presence` answers
    and classified by the subject's last gap without a connection, on the generator's clock
    (from the start of its close to its `authenticated`, an upper bound of the server's
    view): `offline` after a gap shorter than `grace_s` is a flicker the grace should have
    hidden; after a longer one it is due, from a departure or from a reconnect that took
    that long (`slow`). `online` after a gap shorter than the grace (or none) is redundant.
    After the churn stops and `settle_s` passes, every connection's view (its last answer
    plus the live frames since) should show every contact online.
    """
    job = gen.job
    prefix: str = job["user_prefix"]
    count: int = job["users"]
    rate: float = job["reconnect_per_s"]
    grace: float = job.get("grace_s", 5.0)
    away_per_s: float = job.get("away_per_s", 0.0)
    away_s: float = job.get("away_s") or grace + 3.0
    warmup: float = job.get("warmup_s", grace + 1.0)
    duration: float = job["duration_s"]
    settle: float = job.get("settle_s") or grace + 1.0
    rng = random.Random(job.get("seed", 1))
    ids = [contact_user(prefix, index) for index in range(count)]
    neighbours = contacts_of(count, job["contacts"])
    members = [
        _Member(user_id, frozenset(ids[n] for n in neighbours[index]))
        for index, user_id in enumerate(ids)
    ]
    by_id = {member.user_id: member for member in members}
    gen.premint(ids)

    phase = ["setup"]  # setup, warmup, window, after
    counts: dict[str, Counter[str]] = {
        name: Counter() for name in ("setup", "warmup", "window", "after")
    }
    errors: Counter[str] = Counter()
    other: Counter[str] = Counter()
    reconnect_latency: array[float] = array("d")
    fetch_latency: array[float] = array("d")
    start_lag: array[float] = array("d")
    window = [math.inf, math.inf]
    answer_examples: list[dict[str, Any]] = []  # answers that left contacts out

    def on_answer(member: _Member, frame: dict[str, Any], now: float) -> None:
        tally = counts[phase[0]]
        tally["answers"] += 1
        if phase[0] == "window":
            fetch_latency.append(now - member.fetch_sent)
        seen = set()
        for entry in frame.get("data") or []:
            subject = entry.get("user_id")
            seen.add(subject)
            tally["answer_entries"] += 1
            if subject not in member.contacts:
                tally["answer_strangers"] += 1
                continue
            online = bool(entry.get("online"))
            tally["answer_online" if online else "answer_offline"] += 1
            member.view[subject] = online
        missing = member.contacts - seen
        if missing:
            tally["answer_missing"] += len(missing)
            if len(answer_examples) < 5:
                answer_examples.append(
                    {
                        "user_id": member.user_id,
                        "phase": phase[0],
                        "entries": len(frame.get("data") or []),
                        "missing": sorted(missing)[:5],
                    }
                )

    def on_live(member: _Member, entry: dict[str, Any], now: float) -> None:
        tally = counts[phase[0]]
        subject_id = str(entry.get("user_id"))
        online = bool(entry.get("online"))
        member.view[subject_id] = online
        subject = by_id.get(subject_id)
        if subject_id not in member.contacts or subject is None:
            tally["live_strangers"] += 1
            return
        if phase[0] == "setup":
            tally["live_online" if online else "live_offline"] += 1
            return
        gap = subject.gap(now)
        long_gap = gap is not None and gap >= grace
        if online:
            recent = subject.back_at is None or now - subject.back_at < _RETURN_WINDOW_S
            tally["live_online_return" if long_gap and recent else "live_online_redundant"] += 1
        elif not long_gap:
            tally["live_offline_flicker"] += 1
        else:
            tally["live_offline_departed" if subject.departed else "live_offline_slow"] += 1

    async def reader(
        member: _Member,
        user: User,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        done = member.reader_done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                member.scope = scope
                task_status.started()
                frames = user.pending
                user.pending = []
                while True:
                    now = trio.current_time()
                    for frame in frames:
                        kind = frame.get("type")
                        if kind == "presence":
                            if frame.get("request_id") is not None:
                                on_answer(member, frame, now)
                            else:
                                counts[phase[0]]["live_frames"] += 1
                                for entry in frame.get("data") or []:
                                    on_live(member, entry, now)
                        elif kind == "error":
                            errors[str(frame.get("code"))] += 1
                        else:
                            other[str(kind)] += 1
                    try:
                        frames = [orjson.loads(raw) for raw in await user.conn.receive_batch()]
                    except wire.ConnectionClosed as closed:
                        errors[f"closed:{closed.code}"] += 1
                        member.user = None
                        return
        finally:
            done.set()

    async def attach(member: _Member, user: User, nursery: trio.Nursery) -> None:
        """What a client does once bound: ask for its contacts' presence, then listen."""
        member.user = user
        member.view = {}
        member.fetch_sent = trio.current_time()
        await user.send({"type": "fetch_presence", "request_id": "presence"})
        await nursery.start(partial(reader, member, user))

    async def reconnect(member: _Member, due: float, away: bool, nursery: trio.Nursery) -> None:
        measured = window[0] <= due < window[1]
        try:
            if measured:
                start_lag.append(trio.current_time() - due)
            old, member.user = member.user, None
            member.gone_at, member.back_at, member.departed = trio.current_time(), None, away
            if old is not None:
                if member.scope is not None:
                    member.scope.cancel()
                await member.reader_done.wait()
                await old.conn.aclose()
            if away:
                counts[phase[0]]["departures"] += 1
                await trio.sleep(away_s)
            started = trio.current_time()
            try:
                user = await gen.connect(member.user_id)
            except (
                OSError,
                RuntimeError,
                trio.BrokenResourceError,
                wire.HandshakeError,
                wire.ConnectionClosed,
            ) as error:
                errors[f"reconnect:{type(error).__name__}"] += 1
                return
            member.back_at = trio.current_time()
            if measured:
                reconnect_latency.append(member.back_at - started)
            counts[phase[0]]["reconnects"] += 1
            await attach(member, user, nursery)
        finally:
            member.busy = False

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        limiter = trio.CapacityLimiter(job.get("concurrency", 50))

        async def first(member: _Member) -> None:
            async with limiter:
                await attach(member, await gen.connect(member.user_id), nursery)

        with trio.fail_after(_SETUP_TIMEOUT):
            async with trio.open_nursery() as connecting:
                for member in members:
                    connecting.start_soon(first, member)
            while counts["setup"]["answers"] < count:
                if errors:  # e.g. a server without `fetch_presence`: no point waiting
                    raise RuntimeError(f"errors while binding the users: {dict(errors)}")
                await trio.sleep(0.05)
        await trio.sleep(job.get("setup_settle_s", 0.5))  # the last live frames of the setup
        setup_s = trio.current_time() - started
        setup_stale = sum(
            1 for m in members for contact in m.contacts if m.view.get(contact) is not True
        )

        order = list(range(count))
        rng.shuffle(order)
        away_every = round(rate / away_per_s) if away_per_s else 0
        interval = 1.0 / rate
        begin = trio.current_time() + 0.2
        stop_at = begin + warmup + duration
        phase[0] = "warmup"

        async def scheduler(churn: trio.Nursery) -> None:
            """Reconnects at fixed intervals; each runs as its own task, so a slow one does
            not hold the next back (latency counts from its own start)."""
            step = 0
            while (due := begin + step * interval) < stop_at:
                await trio.sleep_until(due)
                member = members[order[step % count]]
                away = bool(away_every) and step % away_every == away_every - 1
                step += 1
                if member.busy:
                    counts[phase[0]]["skipped"] += 1  # still away, or its last one unfinished
                    continue
                member.busy = True
                churn.start_soon(reconnect, member, due, away, nursery)

        async with trio.open_nursery() as churn:
            churn.start_soon(scheduler, churn)
            await trio.sleep_until(begin + warmup)
            await gen.checkpoint("measure_start")
            window[:] = [trio.current_time(), stop_at]
            phase[0] = "window"
            cpu0 = time.process_time()
            await trio.sleep_until(stop_at)
            phase[0] = "after"
            gen_cpu = time.process_time() - cpu0
            await gen.checkpoint("measure_end")
            # the reconnects under way (and absences) end; this is only a safety net
            churn.cancel_scope.deadline = trio.current_time() + away_s + 30.0
        # A flicker would be announced one grace after its close: wait for it.
        await trio.sleep(settle)
        final_stale = sum(
            1
            for m in members
            if m.user is not None
            for contact in m.contacts
            if m.view.get(contact) is not True
        )
        disconnected = sum(1 for member in members if member.user is None)
        nursery.cancel_scope.cancel()
    await close_all([m.user for m in members if m.user is not None], polite=False)
    elapsed = window[1] - window[0]
    measured = counts["window"]
    return {
        "users": count,
        "contacts": job["contacts"],
        "offered_reconnects_per_s": rate,
        "away_per_s": away_per_s,
        "away_s": away_s if away_per_s else None,
        "grace_s": grace,
        "setup_s": setup_s,
        "setup": dict(counts["setup"]),
        "setup_stale": setup_stale,
        "elapsed_s": elapsed,
        "window": dict(measured),
        "after": dict(counts["after"]),
        "reconnects": measured["reconnects"],
        "reconnects_per_s": measured["reconnects"] / elapsed,
        "live_frames": measured["live_frames"],
        "answers": measured["answers"],
        "final_stale": final_stale,
        "disconnected": disconnected,
        "answer_examples": answer_examples,
        "reconnect_latency": percentiles(reconnect_latency),
        "fetch_latency": percentiles(fetch_latency),
        "start_lag": percentiles(start_lag),
        "generator_cpu_s": gen_cpu,
        "errors": dict(errors),
        "other_frames": dict(other),
    }


async def job_seed_contacts(gen: Generator) -> dict[str, Any]:
    """The contact ring of `job_presence` as `create_chat` frames through the server (when the
    store cannot be seeded directly): each user opens the chats it comes first in."""
    job = gen.job
    prefix: str = job["user_prefix"]
    count: int = job["users"]
    ids = [contact_user(prefix, index) for index in range(count)]
    outgoing: list[list[str]] = [[] for _ in range(count)]
    for a, b in ring_contacts(count, job["contacts"]):
        outgoing[a].append(ids[b])
    t0 = trio.current_time()
    users = await gen.connect_many(ids, 50)
    limiter = trio.CapacityLimiter(16)

    async def open_chats(user: User, recipients: list[str]) -> None:
        async with limiter:
            frames = [
                orjson.dumps({"type": "create_chat", "recipient_id": peer, "request_id": n})
                for n, peer in enumerate(recipients)
            ]
            await user.conn.send_texts(frames)
            answered = 0
            while answered < len(recipients):
                frame = await user.next_frame()
                if frame.get("type") == "error":
                    raise RuntimeError(f"seeding failed: {frame}")
                if frame.get("type") == "new_chats" and frame.get("request_id") is not None:
                    answered += 1

    async with trio.open_nursery() as nursery:
        for user, recipients in zip(users, outgoing, strict=True):
            nursery.start_soon(open_chats, user, recipients)
    elapsed = trio.current_time() - t0
    await close_all(users, polite=False)
    return {"chats": sum(map(len, outgoing)), "elapsed_s": elapsed}


JOBS: Final[dict[str, Callable[[Generator], Awaitable[dict[str, Any]]]]] = {
    "relay": job_relay,
    "open_loop": job_open_loop,
    "idle": job_idle,
    "connect": job_connect,
    "backlog": job_backlog,
    "fetch": job_fetch,
    "group": job_group,
    "seed": job_seed,
    "presence": job_presence,
    "seed_contacts": job_seed_contacts,
}


async def run_job(job: dict[str, Any]) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        gen = Generator(job, nursery)
        with trio.fail_after(job.get("deadline_s", 900.0)):
            result = await JOBS[job["kind"]](gen)
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    cpus = usable_cpus(json.loads(os.environ.get("BENCH_LOADGEN_CPUS", "null")))
    if cpus:
        os.sched_setaffinity(0, cpus)
    raise_nofile()
    apply_priority()
    job = json.loads(sys.stdin.readline())
    # Full collections of a heap holding thousands of connections pause the loop for
    # milliseconds, which would show up as latency; a bounded run can afford rare ones.
    gc.set_threshold(50_000, 50, 1000)
    started = time.process_time()
    result = trio.run(run_job, job)
    result["generator_total_cpu_s"] = time.process_time() - started
    emit({"result": result})


if __name__ == "__main__":
    main()
