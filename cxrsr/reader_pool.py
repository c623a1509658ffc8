"""Reader processes in which a dead process costs only the file it was reading.

``concurrent.futures.ProcessPoolExecutor`` treats the death of any worker (the kernel's
OOM killer, a decoder that segfaults on hostile data) as the end of the pool: every
pending future fails with ``BrokenProcessPool``, and nothing says which file did it.
Here the parent hands each reader process one item at a time, and the reader says when
it begins it, so when a process dies the parent knows the one item it was working on:
that item's future gets ``on_death(item, reason)`` ("reader process died (signal 9,
SIGKILL) while reading"), a new process takes the dead one's place, and every other
item goes on. An item sent but not yet begun goes to the next reader. Since a process
never holds more than one item, no innocent bystander is lost with the culprit, and
nothing need be retried to find out which one it was. Readers that keep dying before
they begin anything (a broken installation, a memory limit too small to start one), or
new readers that cannot be started at all, end the run with a :class:`ReaderPoolError`
(exit 3, the cause named) instead of being respawned forever.

A reader that spends longer than ``timeout`` seconds on one item (a decoder caught in a
loop by hostile data) is killed the same way, and its item fails with "reading took
longer than N s": a hung file costs its own result and the wait, never the batch.

A thread of the parent (:meth:`ReaderPool._watch`) collects results and hands out the
next items, so the readers stay busy while the caller's thread runs the network.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Generic, TypeVar

from cxrsr.errors import PipelineError

log = logging.getLogger("cxrsr")

Item = TypeVar("Item")
Result = TypeVar("Result")

#: Deaths of idle readers (holding no item) tolerated per reader before the pool gives
#: up: a process that dies before it even asks for work cannot be helped by another one.
IDLE_DEATHS_PER_READER = 3


class ReaderPoolError(PipelineError):
    """The readers cannot be kept running (exit 3): they keep dying before they read
    anything, or no new process can be started. No file is to blame, so the run ends."""

    exit_code = 3


def death_reason(exitcode: int | None) -> str:
    """What happened to a reader process, from its exit code (negative: killed by a signal)."""
    if exitcode is None:
        return "reader process vanished while reading"
    if exitcode < 0:
        number = -exitcode
        try:
            name = f", {signal.Signals(number).name}"
        except ValueError:
            name = ""
        return f"reader process died (signal {number}{name}) while reading"
    return f"reader process exited with status {exitcode} while reading"


def death_cause(exitcode: int | None) -> str:
    """Why reader processes that keep dying died, with a guess at the cause where one fits."""
    if exitcode is None:
        return "they vanish"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "an unknown signal"
        # SIGKILL from nobody the user knows of is the kernel's OOM killer (or a cgroup's
        # memory limit); the journal or dmesg tells.
        guess = ": out of memory?" if number == signal.SIGKILL else ""
        return f"killed by signal {number}, {name}{guess}"
    return f"they exit with status {exitcode}"


#: Messages from a reader: it has begun an item; it finished it; the function raised.
_STARTED, _DONE, _RAISED = "started", "done", "raised"


def _serve(
    conn: Connection,
    fn: Callable[[Any], Any],
    initializer: Callable[[], None] | None,
) -> None:
    """A reader's whole life: take one item, send back its result, until told to stop."""
    if initializer is not None:
        initializer()
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if item is None:
            return
        try:
            conn.send((_STARTED, None))
            try:
                outcome: tuple[str, Any] = (_DONE, fn(item))
            except BaseException as exc:  # handed back to the caller, as a Future would
                outcome = (_RAISED, exc)
            conn.send(outcome)
        except (BrokenPipeError, OSError):
            return


@dataclass(eq=False)
class _Task(Generic[Item, Result]):
    item: Item
    future: Future[Result]


@dataclass(eq=False)
class _Reader:
    process: BaseProcess
    conn: Connection
    task: _Task[Any, Any] | None = None
    started: bool = False
    """It has said it began ``task``: if it dies now, ``task`` is what killed it."""
    broken: bool = False
    """Its pipe failed: it is dead or dying, and the watcher will replace it."""
    started_at: float = 0.0
    """``time.monotonic()`` when it began ``task``."""
    timed_out: bool = False
    """Killed for taking too long over ``task``."""


class ReaderPool(Generic[Item, Result]):
    """``processes`` spawned processes running ``fn`` on submitted items, one item each at a time.

    ``fn`` and ``initializer`` must be importable module-level functions (the processes
    are spawned, so they never inherit the parent's threads or its loaded model).
    ``timeout``: seconds a reader may spend on one item before it is killed and the item
    fails (``None``: no limit).
    """

    def __init__(
        self,
        fn: Callable[[Item], Result],
        processes: int,
        on_death: Callable[[Item, str], Result],
        initializer: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f'Argument "processes" must be at least 1, not {processes}')
        if timeout is not None and timeout <= 0:
            raise ValueError(f'Argument "timeout" must be positive, not {timeout}')
        self._timeout = timeout
        self._fn = fn
        self._on_death = on_death
        self._initializer = initializer
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._queue: deque[_Task[Item, Result]] = deque()
        self._closing = False
        self._failure: BaseException | None = None
        """Why the pool stopped by itself (readers that keep dying), if it did."""
        self._idle_deaths = 0
        self._max_idle_deaths = IDLE_DEATHS_PER_READER * processes
        self._wake_read, self._wake_write = os.pipe()
        self._readers: list[_Reader] = []
        try:
            for _ in range(processes):
                self._readers.append(self._start_reader())
        except ReaderPoolError:
            self._stop_readers(self._readers)
            os.close(self._wake_read)
            os.close(self._wake_write)
            raise
        self._watcher = threading.Thread(target=self._watch, name="reader-pool", daemon=True)
        self._watcher.start()

    def _start_reader(self) -> _Reader:
        """A new reader process; :class:`ReaderPoolError` when none can be started (the
        process or file limit reached, no memory for another process)."""
        try:
            parent_end, child_end = self._context.Pipe()
        except OSError as exc:
            raise ReaderPoolError(f"cannot start a reader process: {exc}") from exc
        process = self._context.Process(
            target=_serve,
            args=(child_end, self._fn, self._initializer),
            name="cxrsr-reader",
            daemon=True,
        )
        try:
            process.start()
        except OSError as exc:
            parent_end.close()
            raise ReaderPoolError(f"cannot start a reader process: {exc}") from exc
        finally:
            child_end.close()  # so the reader's death reads as EOF on the parent's end
        return _Reader(process, parent_end)

    def submit(self, item: Item) -> Future[Result]:
        """Queue ``item``; its future resolves when a reader has finished it (or died on it)."""
        future: Future[Result] = Future()
        with self._lock:
            if self._failure is not None:  # the readers cannot go on: each item says why
                future.set_exception(self._failure)
                return future
            if self._closing:
                raise RuntimeError("the reader pool is closed")
            self._queue.append(_Task(item, future))
            self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Give queued items to idle readers (with the lock held)."""
        for reader in self._readers:
            if reader.task is not None or reader.broken:
                continue
            while self._queue and self._queue[0].future.cancelled():
                self._queue.popleft()
            if not self._queue:
                return
            task = self._queue.popleft()
            try:
                reader.conn.send(task.item)
            except (BrokenPipeError, OSError):
                # Died before reading it: the item was never started, so it is not the
                # culprit; it waits for the next reader, and the watcher replaces this one.
                reader.broken = True
                self._queue.appendleft(task)
                continue
            reader.task = task

    def _watch(self) -> None:
        """Collect results and deaths until the pool closes (runs in its own thread).

        Should the watcher itself fail, every waiting item gets the error: the caller
        then sees it, rather than waiting forever for readers nobody watches.
        """
        try:
            self._watch_readers()
        except BaseException as exc:
            self._fail_all(exc)
            raise

    def _watch_readers(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                readers = list(self._readers)
            waitables: list[Any] = [self._wake_read]
            for reader in readers:
                waitables += [reader.conn, reader.process.sentinel]
            ready = set(wait(waitables, timeout=self._next_deadline(readers)))
            if self._wake_read in ready:
                os.read(self._wake_read, 512)
            for reader in readers:
                if reader.conn in ready:
                    try:
                        message = reader.conn.recv()
                    except (EOFError, OSError):
                        self._replace(reader)
                        continue
                    if message[0] == _STARTED:
                        reader.started, reader.started_at = True, time.monotonic()
                    else:
                        self._finish(reader, message)
                elif reader.process.sentinel in ready:
                    self._replace(reader)
            self._stop_overdue(readers)

    def _next_deadline(self, readers: list[_Reader]) -> float | None:
        """Seconds until the first busy reader runs out of time (``None``: wait for events)."""
        if self._timeout is None:
            return None
        busy = [r.started_at for r in readers if r.started and not r.timed_out]
        if not busy:
            return None
        return max(0.0, min(busy) + self._timeout - time.monotonic())

    def _stop_overdue(self, readers: list[_Reader]) -> None:
        """Kill each reader that has spent longer than the timeout on its item; its death
        (seen through its sentinel) then fails the item and brings a new reader."""
        if self._timeout is None:
            return
        now = time.monotonic()
        for reader in readers:
            if reader.started and not reader.timed_out and now - reader.started_at > self._timeout:
                reader.timed_out = True
                with contextlib.suppress(OSError):
                    reader.process.kill()

    def _finish(self, reader: _Reader, message: tuple[str, Any]) -> None:
        if reader.timed_out:
            return  # finished just as it was killed: its death reports the item
        with self._lock:
            task, reader.task, reader.started = reader.task, None, False
            self._dispatch()
        if task is None:
            return
        kind, value = message
        if kind == _DONE:
            task.future.set_result(value)
        else:
            task.future.set_exception(value)

    def _replace(self, dead: _Reader) -> None:
        """A reader died: fail the item it held, start another reader in its place."""
        dead.process.join(timeout=5)
        if dead.timed_out:
            reason = f"reading took longer than {self._timeout:g} s; the reader was stopped"
        else:
            reason = death_reason(dead.process.exitcode)
        dead.conn.close()
        with self._lock:
            if self._closing:
                return
            task, dead.task = dead.task, None
            if task is not None and not dead.started:
                # Sent but never begun (the reader died starting up, or idle): not the
                # culprit, so it goes to the next reader.
                self._queue.appendleft(task)
                task = None
            if task is None and not dead.timed_out:  # killed by us: not a broken reader
                self._idle_deaths += 1
            error: ReaderPoolError | None = None
            if self._idle_deaths > self._max_idle_deaths:
                error = ReaderPoolError(
                    "reader processes keep dying before they read anything "
                    f"({death_cause(dead.process.exitcode)})"
                )
            else:
                try:
                    self._readers[self._readers.index(dead)] = self._start_reader()
                except ReaderPoolError as exc:
                    error = exc
                else:
                    self._dispatch()
            if error is not None:
                self._readers.remove(dead)
        if task is not None:
            log.debug("%s: %s", task.item, reason)
            task.future.set_result(self._on_death(task.item, reason))
        if error is not None:
            self._fail_all(error)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._closing = True
            self._failure = error
            tasks = list(self._queue) + [r.task for r in self._readers if r.task is not None]
            self._queue.clear()
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(error)

    def close(self) -> None:
        """Stop the readers at once; queued items are cancelled, items being read are dropped.

        Normal completion has nothing left in flight; on an error or Ctrl-C the caller
        wants out now, not after every queued file has been decoded.
        """
        with self._lock:
            self._closing = True
            for task in self._queue:
                task.future.cancel()
            self._queue.clear()
            readers = list(self._readers)
        os.write(self._wake_write, b"x")
        self._watcher.join()
        self._stop_readers(readers)
        os.close(self._wake_read)
        os.close(self._wake_write)

    @staticmethod
    def _stop_readers(readers: list[_Reader]) -> None:
        """Tell idle readers to stop, terminate busy ones, and wait for all of them."""
        for reader in readers:
            if reader.task is None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    reader.conn.send(None)
            else:
                reader.process.terminate()
        for reader in readers:
            reader.process.join(timeout=5)
            if reader.process.is_alive():
                reader.process.kill()
                reader.process.join()
            reader.conn.close()
            if reader.task is not None and not reader.task.future.done():
                reader.task.future.cancel()

    def __enter__(self) -> ReaderPool[Item, Result]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
