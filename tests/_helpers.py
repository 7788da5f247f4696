"""Helpers shared by the connector tests (imported, not a conftest: no fixtures are auto-applied)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from emp_machine.connectors.base import ConnectorJob

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Progress:
    """A progress callback that records (percent, message) and can fire a hook once on a condition."""

    def __init__(self):
        self.seen: list[tuple[float, str]] = []
        self._hooks: list[tuple[Callable[[float, str], bool], Callable[[], Awaitable]]] = []

    def when(self, condition: Callable[[float, str], bool], action: Callable[[], Awaitable]) -> None:
        self._hooks.append((condition, action))

    async def __call__(self, percent: float, message: str) -> None:
        self.seen.append((percent, message))
        for hook in list(self._hooks):
            if hook[0](percent, message):
                self._hooks.remove(hook)
                await hook[1]()

    @property
    def percents(self) -> list[float]:
        return [p for p, _ in self.seen]


def job(payload, job_id="job-1", service="comfyui") -> ConnectorJob:
    return ConnectorJob(job_id, service, payload, traceparent=TRACEPARENT)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait on a condition with a deadline (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def connector_context(tmp_path, name: str):
    """The ConnectorContext the connector tests share: fixed identity, outputs under tmp_path."""
    import logging

    from emp_machine.connectors.base import ConnectorContext

    return ConnectorContext(machine_id="m1", worker_id="m1-worker-0", output_dir=tmp_path / "out",
                            logger=logging.getLogger(f"test.{name}"))


def sitecustomize_env(folder: Path, source: str) -> dict[str, str]:
    """A fault injected into the processes a test starts: `source` as a sitecustomize module in `folder`,
    which Python imports at start-up; the environment to start them with (PYTHONPATH, this run's kept)."""
    import os

    folder.mkdir()
    (folder / "sitecustomize.py").write_text(source, encoding="utf-8")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH", "")]))}


def install_plugin(site: Path, prefix: str, source: str, entry_points: dict[str, str]) -> str:
    """A connector distribution laid out in `site` as `pip install --target` leaves it: a package named
    `prefix` plus a random suffix (fresh each call: sys.modules keeps imports) holding `source`, and its
    dist-info with `entry_points` (connector name -> class in the package) in the connectors' group.
    Returns the package's name; putting `site` on sys.path / PYTHONPATH is the caller's."""
    from emp_machine.connectors.registry import GROUP

    module = f"{prefix}{random.randrange(1 << 30)}"
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(source)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUP}]\n" + "".join(f"{name} = {module}:{cls}\n" for name, cls in entry_points.items()))
    return module


def gated_listener(folder: Path) -> tuple[Path, Path]:
    """A service for manifests: a script (argv[1] = port) that listens on its port only once the file `gate`
    exists, so a TCP health check turns healthy when the test says. Returns (gate, script)."""
    gate, script = folder / "open", folder / "listener.py"
    script.write_text(f"""import os, socket, sys, time
while not os.path.exists({str(gate)!r}):
    time.sleep(0.02)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
time.sleep(600)
""")
    return gate, script


class TcpProxy:
    """A TCP proxy in front of Redis on a loopback port of its own, served by a thread's event loop;
    subclasses say what `_handle` does with a connection."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.ready = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self.ready.wait(5), "proxy did not start"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        async with server:
            await self._stop.wait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _handle(self, client_reader, client_writer) -> None:
        raise NotImplementedError
