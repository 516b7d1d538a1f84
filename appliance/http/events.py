"""Live updates for open dashboards: each status change as a server-sent event.

The telemetry calls ``publish`` (from the main loop, any thread) whenever the status
changes: a scene starts or ends, the model switches, the node becomes ready or stops. Each
open page holds one ``stream``: an ``event: status`` with the status JSON at once and after
every change (changes that come faster than a page reads are coalesced, the latest status
wins), and a comment line every ``HEARTBEAT_S`` so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

HEARTBEAT_S = 15.0


class Events:
    """Fans status changes out to the open event streams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue[bool]]] = set()
        self._closed = False

    def publish(self) -> None:
        """The status changed (thread-safe)."""
        self._wake(True)

    def close(self) -> None:
        """End every stream (the server stops)."""
        self._closed = True
        self._wake(False)

    def _wake(self, more: bool) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(_offer, queue, more)
            except RuntimeError:  # that stream's loop has ended
                continue

    async def stream(self, render: Callable[[], str]) -> AsyncIterator[str]:
        """Server-sent events of ``render()`` (the status JSON) until ``close``."""
        queue: asyncio.Queue[bool] = asyncio.Queue(maxsize=1)
        entry = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._subscribers.add(entry)
        try:
            more = not self._closed
            while more:
                data = await asyncio.to_thread(render)
                yield f"event: status\ndata: {data}\n\n"
                while True:
                    try:
                        more = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                        break
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"
                more = more and not self._closed
        finally:
            with self._lock:
                self._subscribers.discard(entry)


def _offer(queue: asyncio.Queue[bool], more: bool) -> None:
    """Put ``more`` unless a wake-up is already waiting (a stop always gets through)."""
    if queue.full():
        if more:
            return
        queue.get_nowait()
    queue.put_nowait(more)
