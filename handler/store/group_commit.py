"""Group commit: the one writer both stores use, from the queue to the hand-off.

This module owns the write path's Trio side; a backend supplies only what is its own: `apply`,
a function that runs a batch of operations as ONE transaction in a worker thread, and the
`BatchThread` that runs it there. It knows no SQL and no driver.

Theory of operation:
- A caller builds an `Op` and queues it. `submit` waits for the commit and returns the op's
  result (or raises its error); `enqueue` returns once the op is queued (delivery marks, which
  nobody waits to commit). The queue is bounded (`MAX_QUEUED`): when it is full both wait for
  room, so a burst of writes slows its writers down instead of growing memory. Nothing queued
  is ever dropped.
- One Trio task (`run`) takes every op queued so far, up to `max_batch`, and hands the batch to
  the backend's thread. There `apply` fills each op's `result` or `error`, and `committed`
  for a write that created something (a new chat, a new message). Once the batch is handed to
  the thread it is shielded from cancellation: it must finish and report, or a committed write
  could be reported as failed.
- After the batch, and before any of its callers is woken, the writer sends each `committed`
  of the batch, in commit order, to the `commits` channel (the hub's publisher drains it). A
  full channel makes the writer wait: fan-out backpressure reaches the writers, nothing is
  dropped. A closed receive end is logged once and ignored: the write is stored, and the
  backlog delivers it. The writer never runs the receiver's code, so a bug in fan-out cannot
  stop the store.
- `close` stops taking new ops; the task commits and hands over everything queued, closes
  `commits`, stops the thread and returns. If the task is cancelled instead, ops still queued
  fail with `StoreUnavailable` rather than leaving their callers waiting forever.

The two thread mechanisms are both kept because each is the cheaper one for its backend:
SQLite's writer owns a dedicated thread fed through a `SimpleQueue` (`DedicatedThread`, about
half the CPU of a `trio.to_thread` round trip, measured, and at moderate load most batches hold
one message), while PostgreSQL's batches run on Trio's worker threads one at a time
(`WorkerThread`), where the round trip is small next to the database's.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, Generic, Protocol, TypedDict, TypeVar

import attrs
import outcome
import trio

from handler.errors import StoreUnavailable
from handler.store.base import CommitSender, Committed

log = logging.getLogger("handler.store")

R = TypeVar("R")

# How many ops may wait in the queue before writers wait for room. An op holds at most one
# message (bounded by the protocol's `max_message_chars`), so this also bounds the queue's
# memory; at the measured group-commit rates it is well under a second of writes.
MAX_QUEUED: Final = 4096
# How many ops one transaction takes at most: bounds one commit's latency and lock time.
MAX_BATCH: Final = 512


class WriterOptions(TypedDict, total=False):
    """The writer's bounds, as a store's constructor passes them on (`**options`)."""

    max_batch: int
    max_queued: int


@attrs.define(eq=False)
class Op:
    """One queued write. The backend subclasses it with what its `apply` needs.

    `apply` fills `result` or `error`, and `committed` when the write created something;
    the writer then hands `committed` over and sets `done`. `awaited` is False for an op
    queued with `enqueue`: nobody reads its error, so the writer counts it in `lost_marks`.
    """

    result: Any = attrs.field(default=None, init=False)
    error: BaseException | None = attrs.field(default=None, init=False)
    # One commit, or several (a batch of delivery marks moves several marks).
    committed: Committed | tuple[Committed, ...] | None = attrs.field(default=None, init=False)
    awaited: bool = attrs.field(default=True, init=False)
    done: trio.Event = attrs.field(factory=trio.Event, init=False)

    def reset(self) -> None:
        """Forget an earlier attempt (a batch retried or replayed one op at a time)."""
        self.result = None
        self.error = None
        self.committed = None

    def fail(self, error: BaseException) -> None:
        self.reset()
        self.error = error


OpT = TypeVar("OpT", bound=Op)

# Runs in the worker thread: applies the batch as one transaction (or, on a failure, as much
# of it as the backend's retry policy saves), filling every op; returns why the database could
# not write (disk full, I/O error) or None. The writer keeps that as `write_failure`.
Apply = Callable[[list[OpT]], str | None]


class BatchThread(Protocol):
    """Where batches run: off the Trio thread, one at a time, in the order given."""

    async def run(self, job: Callable[[], R]) -> R:
        """Run `job` in the thread and return its result (or raise its exception)."""
        ...

    async def aclose(self) -> None:
        """Release the thread; no `run` follows."""
        ...


class DedicatedThread:
    """A thread of the writer's own, started on first use, fed through a `SimpleQueue`;
    `run_sync_soon` brings each result back. (SQLite: see the module docstring.)"""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _main(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()

    async def run(self, job: Callable[[], R]) -> R:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        results: list[outcome.Outcome[R]] = []

        def work() -> None:
            # Captured, so a raising job neither kills the thread nor leaves `run` waiting.
            results.append(outcome.capture(job))
            token.run_sync_soon(finished.set)

        self._jobs.put(work)
        await finished.wait()
        return results[0].unwrap()

    async def aclose(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            await trio.to_thread.run_sync(self._thread.join)
            self._thread = None


class WorkerThread:
    """`trio.to_thread.run_sync` with a `CapacityLimiter(1)`: one batch at a time on Trio's
    thread cache, without taking tokens of the default limiter that reads share.
    (PostgreSQL: see the module docstring.)"""

    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, job: Callable[[], R]) -> R:
        return await trio.to_thread.run_sync(job, limiter=self._limiter)

    async def aclose(self) -> None:
        """Nothing to release: Trio's cached threads outlive the writer."""


@attrs.frozen
class WriterStatistics:
    """A snapshot of the writer (Trio's `statistics()` convention)."""

    batches: int
    operations: int
    lost_marks: int
    queued: int
    max_queued: int
    senders_waiting: int


class GroupCommitWriter(Generic[OpT]):
    """One task, one backend thread: every batch of queued ops becomes one transaction, and
    what it created is handed to `commits` in commit order before its callers resume.

    Public attributes: `after_commit`, a test hook (see below); `write_failure`, why the
    database could not write, until `check_writes` proves it can again (/healthz reports
    it); `batches` and `operations` committed so far (their ratio is the group-commit
    factor); `lost_marks`, ops queued with `enqueue` that failed (`flush` reports them).
    """

    def __init__(
        self,
        apply: Apply[OpT],
        thread: BatchThread,
        *,
        max_batch: int = MAX_BATCH,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        if max_batch < 1 or max_queued < 1:
            raise ValueError("max_batch and max_queued must be at least 1")
        self._apply = apply
        self._thread = thread
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._send, self._receive = trio.open_memory_channel[OpT](max_queued)
        self._commits: CommitSender | None = None
        self._started = False
        self._stopped = trio.Event()
        # The test hook: run in the worker thread after every batch, once its transaction has
        # ended (COMMIT returned, or the batch failed), before the hand-off. Tests set it to
        # widen the window between COMMIT and the hand-off to the fan-out, or to hold the
        # writer still. It must not raise (an exception is logged and ignored).
        self.after_commit: Callable[[], None] | None = None
        self.write_failure: str | None = None
        self.batches = 0
        self.operations = 0
        self.lost_marks = 0

    def statistics(self) -> WriterStatistics:
        channel = self._send.statistics()
        return WriterStatistics(
            batches=self.batches,
            operations=self.operations,
            lost_marks=self.lost_marks,
            queued=channel.current_buffer_used,
            max_queued=self._max_queued,
            senders_waiting=channel.tasks_waiting_send,
        )

    # ------------------------------------------------------------------ callers

    async def submit(self, op: OpT) -> Any:
        """Queue `op` (waiting for room) and return its result once it is committed.

        Raises the op's error, or `StoreUnavailable` when the writer is not running.
        """
        await self._put(op)
        await op.done.wait()
        if op.error is not None:
            raise op.error
        return op.result

    async def enqueue(self, op: OpT) -> None:
        """Queue `op` (waiting for room) without waiting for its commit; its failure is
        counted in `lost_marks`. Raises `StoreUnavailable` when the writer is not running."""
        op.awaited = False
        await self._put(op)

    async def flush(self, op: OpT) -> None:
        """Commit `op` (a write that writes nothing) behind everything queued before it.

        Raises `StoreUnavailable` when an op queued with `enqueue` failed meanwhile: its
        caller did not wait, so this is where it hears that it was not recorded.
        """
        lost = self.lost_marks
        await self.submit(op)
        if self.lost_marks != lost:
            raise StoreUnavailable("delivery marks queued before could not be recorded")

    async def check_writes(self, probe: OpT) -> None:
        """While writes are failing, commit `probe` (a real write) to learn whether they
        work again; raise `StoreUnavailable` if not. Only a probe that succeeds clears
        `write_failure`: an empty commit can succeed on a disk that has no room."""
        failure = self.write_failure
        if failure is None:
            return
        try:
            await self.submit(probe)
        except StoreUnavailable:
            raise StoreUnavailable(f"writes are failing: {failure}") from None
        self.write_failure = None

    async def _put(self, op: OpT) -> None:
        """Queue `op`, waiting only when the queue is full. No checkpoint while there is
        room: `submit` waits for the commit anyway, and a yield per write costs a scheduler
        round per message on the hot path."""
        if not self._started:
            raise StoreUnavailable("the store is not open")
        try:
            try:
                self._send.send_nowait(op)
            except trio.WouldBlock:
                await self._send.send(op)  # backpressure: the writer is behind
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise StoreUnavailable("the store is closed") from None

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Take no more ops; the task commits what is queued, then ends (see `aclose`)."""
        self._send.close()

    async def aclose(self) -> None:
        """`close`, then wait until the task has committed and handed over everything queued
        and closed `commits` (at once if it never ran)."""
        self.close()
        if self._started:
            await self._stopped.wait()

    async def run(
        self,
        commits: CommitSender | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The writer task (start it with `nursery.start`); returns after `close` once the
        queue is drained. Ownership of `commits` passes to it: it is closed on the way out."""
        if self._started:
            raise RuntimeError("a GroupCommitWriter runs once")
        self._started = True
        self._commits = commits
        try:
            task_status.started()
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)
        finally:
            self._abandon_queued()
            if commits is not None:
                commits.close()
            with trio.CancelScope(shield=True):
                await self._thread.aclose()
            self._stopped.set()

    # ------------------------------------------------------------------ the writer task

    async def _commit(self, batch: list[OpT]) -> None:
        with trio.CancelScope(shield=True):
            try:
                failure = await self._thread.run(functools.partial(self._in_thread, batch))
            except Exception as error:
                # A bug in `apply` must fail its batch, not kill the writer and every later
                # write with it. Whether anything was committed is unknown: say so.
                log.exception("the store's writer failed a batch of %d", len(batch))
                failure = f"writer failed, outcome unknown: {error!r}"
                for op in batch:
                    op.fail(StoreUnavailable(failure))
        if failure is not None:
            self.write_failure = failure
        self.batches += 1
        self.operations += len(batch)
        self.lost_marks += sum(1 for op in batch if op.error is not None and not op.awaited)
        try:
            # Not shielded: a receiver that stopped draining must not hold up a shutdown.
            # Cancelled here, the rest of the batch is simply not handed over (it is stored).
            await self._hand_over(batch)
        finally:
            for op in batch:
                op.done.set()

    def _in_thread(self, batch: list[OpT]) -> str | None:
        failure = self._apply(batch)
        hook = self.after_commit
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("the writer's after_commit hook raised")
        return failure

    async def _hand_over(self, batch: list[OpT]) -> None:
        """What the batch created, in commit order. Without a checkpoint per item while there
        is room: a batch is handed over in one go, not one item per scheduler round."""
        for op in batch:
            if self._commits is None:
                return
            committed = op.committed
            if op.error is None and committed is not None:
                try:
                    if isinstance(committed, tuple):
                        for each in committed:
                            await self._hand_one(self._commits, each)
                    else:
                        await self._hand_one(self._commits, committed)
                except trio.BrokenResourceError:
                    log.warning(
                        "nobody receives the store's commits any more; new writes are"
                        " stored but not handed to the fan-out (the backlog delivers them)"
                    )
                    self._commits = None

    @staticmethod
    async def _hand_one(commits: CommitSender, committed: Committed) -> None:
        try:
            commits.send_nowait(committed)
        except trio.WouldBlock:
            await commits.send(committed)  # backpressure: wait for room

    def _abandon_queued(self) -> None:
        """After the task ended early (cancelled): fail what is still queued, so no caller
        waits forever, and refuse what comes later. After a normal end the queue is empty."""
        while True:
            try:
                op = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            op.fail(StoreUnavailable("the store stopped before this write was committed"))
            if not op.awaited:
                self.lost_marks += 1
            op.done.set()
        self._receive.close()


__all__ = [
    "MAX_BATCH",
    "MAX_QUEUED",
    "Apply",
    "BatchThread",
    "DedicatedThread",
    "GroupCommitWriter",
    "Op",
    "WorkerThread",
    "WriterOptions",
    "WriterStatistics",
]
