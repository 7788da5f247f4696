"""A loopback TCP proxy in front of a real Redis, with the faults of a broken network path (a thread of its own).

stall():  nothing is forwarded either way; connections stay open and new ones are held too. resume() delivers.
cut(marker=b""): a dropped NAT entry: every connection open now (or only those whose client has sent `marker`,
          e.g. b"SUBSCRIBE") is black-holed for good: bytes read and discarded, never closed. New ones work.
opened(marker): how many connections whose client sent `marker` were opened so far (a resubscription shows).
split(marker, pause): every reply carrying `marker` reaches the client in two TCP segments, `pause` apart,
          the first ending just after `marker` (a reply half read when a reader's timeout fires).
"""

from __future__ import annotations

import asyncio
import threading


class _Conn:
    def __init__(self) -> None:
        self.dead = False
        self.sent = b""  # the client's first bytes, to match a marker against


class StallProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.conns: list[_Conn] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._split: tuple[bytes, float] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._started.wait(5):
            raise RuntimeError("proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _call(self, fn):
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def stall(self) -> None:
        self._call(self._flowing.clear)

    def resume(self) -> None:
        self._call(self._flowing.set)

    def cut(self, marker: bytes = b"") -> int:
        def f():
            hit = [c for c in self.conns if not c.dead and marker in c.sent]
            for c in hit:
                c.dead = True
            return len(hit)
        return self._call(f)

    def split(self, marker: bytes, pause: float) -> None:
        self._split = (marker, pause)

    def opened(self, marker: bytes = b"") -> int:
        return self._call(lambda: sum(1 for c in self.conns if marker in c.sent))

    def close(self) -> None:
        async def shut():
            self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
        try:
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        conn = _Conn()
        self.conns.append(conn)  # kept after it closes: opened() counts them all
        try:
            sr, sw = await asyncio.open_connection(*self.target)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(self._pump(cr, sw, conn, True), self._pump(sr, cw, conn, False),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # close(): ends here, not as an error of asyncio's stream callback
        finally:
            for w in (cw, sw):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn,
                    from_client: bool) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                while conn.dead:  # a black hole never tells the other side anything
                    await asyncio.sleep(3600)
                return
            if from_client and len(conn.sent) < 4096:
                conn.sent += data[:4096]
            await self._flowing.wait()
            if conn.dead:
                continue
            if not from_client and self._split and (at := data.find(self._split[0])) >= 0:
                cut = at + len(self._split[0])
                writer.write(data[:cut])
                await writer.drain()
                await asyncio.sleep(self._split[1])
                data = data[cut:]
            writer.write(data)
            await writer.drain()
