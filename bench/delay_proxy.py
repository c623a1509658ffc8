#!/usr/bin/env python3
"""A loopback TCP proxy that delays each direction, to model a PACS across a network.

This machine has no ``netem``, so latency is added in user space: every chunk read
from one side is written to the other side ``delay`` seconds after it was read, in
order, without limiting bandwidth (chunks in flight overlap, as on a real link). A
new connection first waits one round trip (``2 * delay``) before it is relayed, as a
TCP handshake would cost across the network; this is what a one-connection-per-file
upload pays again for every file.

Used by ``bench_upload.py`` in-process (:class:`DelayProxy` as a context manager), or
alone, bounded in time::

    python bench/delay_proxy.py --target 127.0.0.1:8042 --delay-ms 5 --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time

_CHUNK = 256 * 1024


class DelayProxy:
    """Listen on ``127.0.0.1:port`` and relay to ``target`` with ``delay`` seconds each way.

    Runs its own event loop in a daemon thread; :meth:`stop` (or leaving the ``with``
    block) closes the listener and every relayed connection.
    """

    def __init__(self, target_host: str, target_port: int, delay: float = 0.005) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DelayProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.sleep(2 * self.delay)  # the handshake's round trip
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return  # the target is down: the client sees the connection close
            try:
                await asyncio.gather(
                    self._pipe(client_reader, server_writer),
                    self._pipe(server_reader, client_writer),
                )
            finally:
                server_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            client_writer.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk released ``delay`` after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                await queue.put((time.monotonic() + self.delay, data))
                if not data:
                    return

        async def write() -> None:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                writer.write(data)
                try:
                    await writer.drain()
                except OSError:
                    return

        reading = asyncio.ensure_future(read())
        try:
            await write()
        finally:
            reading.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="delay each way (default: 5)")
    parser.add_argument(
        "--seconds", type=float, default=600.0, help="stop after this long (default: 600)"
    )
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with DelayProxy(host or "127.0.0.1", int(port), args.delay_ms / 1000) as proxy:
        print(f"relaying {proxy.url} -> {args.target} with {args.delay_ms} ms each way", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(args.seconds)


if __name__ == "__main__":
    main()
