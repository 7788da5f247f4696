"""The machine process's own small asyncio Redis client (RESP2): PING, pipelined reads, PUBLISH, SUBSCRIBE.

Why not redis-py here: importing `redis` costs the machine process 9.4 MB of resident memory (the package
loads every command module, its cluster client and OpenTelemetry instrumentation), and the machine's
budget with supervisord is 80 MB. The machine only polls worker state and publishes status; workers,
the CLI and tests keep redis-py. Replies are decoded to `str` like redis-py's `decode_responses=True`.

Errors: a connection that cannot be made or breaks raises `ConnectionError` (an `OSError`) and is reopened
on the next call; a server error reply raises `RespError`; a round trip longer than `timeout` (counted from
when this caller holds the connection, not while it waits for another caller's round trip) raises
`TimeoutError` (an `OSError`) and drops the connection, whose late reply could never be matched.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class RespError(Exception):
    """Redis answered with an error reply (`-ERR ...`)."""


def _encode(args: Sequence[Any]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readuntil(b"\r\n")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [await _read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply from Redis: {line[:40]!r}")


class _Target:
    """Where and how to connect, parsed once from a redis://, rediss:// or unix:// URL, the way redis-py's
    `parse_url` reads it (the workers and the CLI connect with redis-py: every process must reach the same
    server, user and db). The netloc's user and password win over `?username=` / `?password=`; `?db=` wins
    over the path's db; a path that is no number is db 0. For rediss://, the TLS options redis-py takes from
    the query (`ssl_cert_reqs` none / optional / required, `ssl_check_hostname`, `ssl_ca_certs`, `ssl_ca_path`,
    `ssl_certfile`, `ssl_keyfile`, `ssl_password`) are honoured too: this client used to ignore them all, so
    with `?db=3` the machine polled db 0 (workers "not registered" while they ran jobs in db 3), and with
    `?ssl_cert_reqs=none` or a private CA in `?ssl_ca_certs=` it could not connect at all."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.query = {name: values[0] for name, values in parse_qs(parts.query).items() if values}
        self.unix_path = unquote(parts.path) if parts.scheme == "unix" else None
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else self.query.get("username")
        self.password = unquote(parts.password) if parts.password else self.query.get("password")
        self.db = redis_url_db(url)

    def _tls_context(self) -> _ssl.SSLContext:
        query = self.query
        reqs = {"none": _ssl.CERT_NONE, "optional": _ssl.CERT_OPTIONAL,
                "required": _ssl.CERT_REQUIRED}.get(query.get("ssl_cert_reqs", "required"))
        if reqs is None:
            raise ValueError(f"ssl_cert_reqs must be none, optional or required, not {query['ssl_cert_reqs']!r}")
        context = _ssl.create_default_context()
        check = query.get("ssl_check_hostname", "")
        context.check_hostname = reqs != _ssl.CERT_NONE and check.upper() not in ("0", "F", "FALSE", "N", "NO")
        context.verify_mode = reqs
        if query.get("ssl_certfile") or query.get("ssl_keyfile"):
            context.load_cert_chain(query.get("ssl_certfile"), query.get("ssl_keyfile"), query.get("ssl_password"))
        if query.get("ssl_ca_certs") or query.get("ssl_ca_path"):
            context.load_verify_locations(query.get("ssl_ca_certs"), query.get("ssl_ca_path"))
        return context

    async def open(self, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if self.unix_path:
                opening = asyncio.open_unix_connection(self.unix_path)
            else:
                opening = asyncio.open_connection(self.host, self.port,
                                                  ssl=self._tls_context() if self.tls else None)
            reader, writer = await asyncio.wait_for(opening, timeout)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:  # (ssl.SSLError is an OSError)
            raise ConnectionError(f"cannot connect to Redis: {_why(exc)}") from None
        hello = []
        if self.username:  # a user with no password too, as redis-py logs in (AUTH user "")
            hello.append(("AUTH", self.username, self.password or ""))
        elif self.password is not None:
            hello.append(("AUTH", self.password))
        if self.db:
            hello.append(("SELECT", self.db))
        if hello:
            writer.write(b"".join(_encode(cmd) for cmd in hello))
            for _ in hello:
                reply = await asyncio.wait_for(_read_reply(reader), timeout)
                if isinstance(reply, RespError):
                    writer.close()
                    raise reply
        return reader, writer


def _why(exc: BaseException) -> str:
    """An exception's class, and for TLS the reason (a certificate that does not verify, a bad option): never
    the URL, so no secret."""
    if isinstance(exc, _ssl.SSLError) and getattr(exc, "reason", None):
        return f"{exc.__class__.__name__} ({exc.reason})"
    if isinstance(exc, ValueError):
        return f"{exc.__class__.__name__} ({exc})"
    return exc.__class__.__name__


def redis_url_db(url: str) -> int:
    """The db a Redis URL selects, as redis-py reads it: `?db=` first (a ValueError when it is no number),
    else the path's number (redis:// and rediss:// only), else 0."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if query.get("db"):
        try:
            return int(query["db"][0])
        except ValueError:
            raise ValueError(f"its ?db= is not a number: {query['db'][0]!r}") from None
    if parts.scheme != "unix" and parts.path:
        try:
            return int(unquote(parts.path).replace("/", ""))
        except ValueError:
            return 0
    return 0


class MiniRedis:
    """One connection, used by one caller at a time (a lock orders concurrent calls)."""

    def __init__(self, url: str, *, connect_timeout: float = 2.0, timeout: float | None = None):
        self._target = _Target(url)
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send all commands, read all replies (error replies are returned as RespError values)."""
        async with self._lock:  # the timeout starts here: waiting for another caller's round trip is not ours
            if self._timeout is None:
                return await self._round_trip(commands)
            try:
                return await asyncio.wait_for(self._round_trip(commands), self._timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no reply from Redis within {self._timeout:g}s") from None

    async def _round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        if self._conn is None:
            self._conn = await self._target.open(self._connect_timeout)
        reader, writer = self._conn
        try:
            writer.write(b"".join(_encode(cmd) for cmd in commands))
            await writer.drain()
            return [await _read_reply(reader) for _ in commands]
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError) as exc:
            self._drop()  # half-read replies: this connection can never be trusted again
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ConnectionError(f"Redis connection lost: {exc.__class__.__name__}") from None

    async def execute(self, *args: Any) -> Any:
        reply = (await self.execute_many([args]))[0]
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def ping(self) -> bool:
        return await self.execute("PING") == "PONG"

    async def publish(self, channel: str, message: str) -> int:
        return int(await self.execute("PUBLISH", channel, message))

    def pubsub(self, ignore_subscribe_messages: bool = True) -> "PubSub":
        return PubSub(self._target, self._connect_timeout)

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def aclose(self) -> None:
        self._drop()


class PubSub:
    """A subscribing connection of its own; `get_message` returns redis-py-shaped `message` dicts."""

    def __init__(self, target: _Target, connect_timeout: float):
        self._target = target
        self._connect_timeout = connect_timeout
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._reading: asyncio.Task | None = None  # a reply being read, kept across get_message's timeouts
        self.last_reply = time.monotonic()  # when the server last said anything on this connection

    async def subscribe(self, *channels: str) -> None:
        self._conn = await self._target.open(self._connect_timeout)
        self._conn[1].write(_encode(("SUBSCRIBE", *channels)))
        await self._conn[1].drain()
        self.last_reply = time.monotonic()

    async def ping(self) -> None:
        """PING on the subscribed connection; its ["pong", ""] reply only moves `last_reply` (get_message returns
        None for it): a quiet subscription that stays silent past a PING was dropped without a word."""
        if self._conn is None:
            raise ConnectionError("not subscribed")
        self._conn[1].write(_encode(("PING",)))
        await self._conn[1].drain()

    async def get_message(self, ignore_subscribe_messages: bool = True, timeout: float | None = None) -> dict | None:
        if self._conn is None:
            raise ConnectionError("not subscribed")
        # A timeout must not cancel a reply half read (its header consumed, its elements then taken for replies
        # of their own: the message lost): the read goes on in its task, picked up by the next call.
        if self._reading is None:
            self._reading = asyncio.ensure_future(_read_reply(self._conn[0]))
        done, _ = await asyncio.wait({self._reading}, timeout=timeout)
        if not done:
            return None
        reading, self._reading = self._reading, None
        try:
            reply = reading.result()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ConnectionError(f"Redis subscription lost: {exc.__class__.__name__}") from None
        self.last_reply = time.monotonic()
        if isinstance(reply, RespError):
            raise reply
        if not isinstance(reply, list) or len(reply) < 3:
            return None
        kind = reply[0]
        if kind != "message" and ignore_subscribe_messages:
            return None
        return {"type": kind, "channel": reply[1], "data": reply[2]}

    async def aclose(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
            self._reading = None
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
