"""Run a fake service on its own event loop in a thread: like a separate process, it keeps serving while
the test's loop is busy, and it can be killed and restarted on the same loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web


class ServerThread:
    """`make_app()` builds the aiohttp app for each (re)start; `url` stays the same across restarts."""

    def __init__(self, make_app: Callable[[], web.Application]):
        self._make_app = make_app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fake-server")
        self._thread.start()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine, timeout: float = 10) -> Any:
        """Run a coroutine on the server's loop from a synchronous test; return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, coro: Coroutine) -> Any:
        """The same from inside the test's own event loop, without blocking it."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._make_app(), shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # port 0 first: a free one
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> ServerThread:
        self.call(self._start())
        return self

    async def _cancel_the_rest(self) -> None:
        # Whatever still runs on this loop (a simulated execution, a held request) is cancelled and awaited
        # here, so closing the loop leaves no pending task for asyncio to complain about at exit.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        try:
            self.call(self._stop())
            self.call(self._cancel_the_rest())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()
