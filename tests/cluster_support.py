"""Handler nodes in the test's Trio run that share one PostgreSQL schema and one Redis prefix.

A `ClusterServer` is a `RunningServer` (so every end-to-end helper accepts it) whose `open`,
`open_raw` and `connect` alternate between its nodes, as a load balancer without sticky
sessions would; HTTP helpers and `.app` address the first node.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from support import Client, RawClient, RunningServer, make_config

from handler.app import create_app
from handler.server import serve

NODES: Final = 2
SHUTDOWN_TIMEOUT_S: Final = 15.0


@attrs.define
class ClusterServer(RunningServer):
    """Several nodes behind one `RunningServer` face; connections alternate between them."""

    nodes: list[RunningServer] = attrs.field(factory=list)
    turns: Iterator[int] = attrs.field(factory=itertools.count)

    def next_node(self) -> RunningServer:
        return self.nodes[next(self.turns) % len(self.nodes)]

    @asynccontextmanager
    async def open(self, **options: Any) -> AsyncIterator[Client]:
        async with self.next_node().open(**options) as client:
            yield client

    @asynccontextmanager
    async def open_raw(self, **options: Any) -> AsyncIterator[RawClient]:
        async with self.next_node().open_raw(**options) as client:
            yield client

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        for node in self.nodes:
            node.stop_event.set()
        with trio.fail_after(timeout):
            for node in self.nodes:
                await node.stopped.wait()


class Cluster:
    """Starts nodes in `nursery` on the given PostgreSQL DSN and Redis URL and prefix."""

    def __init__(
        self, nursery: trio.Nursery, tmp_path: Path, dsn: str, redis_url: str, prefix: str
    ) -> None:
        self._nursery = nursery
        self._tmp_path = tmp_path
        self._shared = {
            "storage": {"backend": "postgres", "dsn": dsn, "pool_size": 4},
            "bus": {"backend": "redis", "url": redis_url, "prefix": prefix},
        }
        self._counter = itertools.count()
        self.nodes: list[RunningServer] = []

    async def start_node(self, **overrides: Any) -> RunningServer:
        directory = self._tmp_path / f"node{next(self._counter)}"
        directory.mkdir()
        for key, value in self._shared.items():
            overrides[key] = {**overrides.get(key, {}), **value}
        config = make_config(directory, **overrides)
        app = create_app(config)
        stop, stopped = trio.Event(), trio.Event()

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await serve(config, shutdown_trigger=stop.wait, app=app, task_status=task_status)
            finally:
                stopped.set()

        urls: list[str] = await self._nursery.start(run)
        node = RunningServer(config, urls[0], app, stop, stopped)
        self.nodes.append(node)
        return node

    async def start(self, nodes: int = NODES, **overrides: Any) -> ClusterServer:
        members = [await self.start_node(**overrides) for _ in range(nodes)]
        first = members[0]
        return ClusterServer(
            first.config, first.http_url, first.app, first.stop_event, first.stopped, members
        )

    async def stop_all(self) -> None:
        for node in self.nodes:
            node.stop_event.set()
        with trio.fail_after(SHUTDOWN_TIMEOUT_S):
            for node in self.nodes:
                await node.stopped.wait()
