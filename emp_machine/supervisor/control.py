"""XML-RPC client for supervisord over its private unix socket: start, stop, restart, process info.

Synchronous on purpose: the CLI uses it directly and the machine calls it through `asyncio.to_thread`.
One client is not thread-safe; the machine serialises its calls.
"""

from __future__ import annotations

import http.client
import json
import socket
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from supervisor.xmlrpc import Faults, SupervisorTransport

from emp_machine.errors import SupervisorError

# supervisord's answers to a start whose command cannot be run (it does not try, or the spawn failed)
REFUSED_START = (Faults.NO_FILE, Faults.NOT_EXECUTABLE, Faults.SPAWN_ERROR)


@dataclass(frozen=True)
class ProcessInfo:
    """One row of `emp-machine ps`, merged from supervisord and the restart policy."""

    name: str
    state: str  # supervisord's state name, or ERRORED when the restart policy gave up for now
    pid: int
    start: int  # epoch seconds of the last start, 0 if never started
    now: int
    restarts: int
    exit_status: int | None
    errored_reason: str
    restart_in: float | None
    description: str

    @property
    def uptime(self) -> float:
        return float(self.now - self.start) if self.pid and self.start else 0.0


class Supervisor:
    """A handle on one running supervisord."""

    def __init__(self, socket_path: Path | str, timeout: float = 10.0):
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _proxy(self):
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        transport._get_connection = lambda: _TimeoutUnixConnection(self.socket_path, self.timeout)
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def call(self, method: str, *args):
        """Call `namespace.method`; connection problems become SupervisorError with the socket path."""
        try:
            return self._rpc(method, *args)
        except xmlrpc.client.Fault as fault:
            raise SupervisorError(f"supervisord refused {method}{args!r}: {fault.faultString}") from None

    def is_up(self) -> bool:
        try:
            return self.call("supervisor.getState")["statename"] == "RUNNING"
        except SupervisorError:
            return False

    def processes(self) -> list[ProcessInfo]:
        infos = self.call("supervisor.getAllProcessInfo")
        policy = json.loads(self.call("emp.getPolicyState"))
        rows = []
        for info in infos:
            extra = policy.get(info["name"], {})
            state = info["statename"]
            if extra.get("errored") and state in ("EXITED", "FATAL", "BACKOFF", "STOPPED"):
                state = "ERRORED"
            rows.append(ProcessInfo(
                name=info["name"], state=state, pid=info["pid"], start=info["start"], now=info["now"],
                restarts=extra.get("restarts", 0), exit_status=extra.get("last_exit_status"),
                errored_reason=extra.get("errored_reason", ""), restart_in=extra.get("restart_in"),
                description=info.get("description", ""),
            ))
        return rows

    def start(self, name: str, wait: bool = False) -> None:
        """Start `name`. A start supervisord refuses because the command cannot be run marks it errored (the
        restart policy tries again after its cool-down; `ps` and /health give the reason) and raises."""
        try:
            self._rpc("supervisor.startProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode == Faults.ALREADY_STARTED:
                return
            if fault.faultCode in REFUSED_START:
                try:
                    self._rpc("emp.markErrored", name, f"could not start: {fault.faultString}")
                except (xmlrpc.client.Fault, SupervisorError):
                    pass  # the start error below says what happened
            raise SupervisorError(f"could not start {name}: {fault.faultString}") from None

    def stop(self, name: str, wait: bool = True) -> None:
        """Stop `name` and keep it down: the restart policy will not bring it back. StopUnanswered: the stop
        reached supervisord and no answer came back (it died or hung meanwhile): it may have sent the stop
        signal already."""
        self.call("emp.hold", name)
        try:
            self._rpc("supervisor.stopProcess", name, wait)
        except xmlrpc.client.Fault as fault:
            if fault.faultCode != Faults.NOT_RUNNING:
                raise SupervisorError(f"could not stop {name}: {fault.faultString}") from None
        except SupervisorError as exc:
            if exc.unreached:
                raise
            raise StopUnanswered(str(exc)) from None

    def restart(self, name: str) -> None:
        """Graceful restart: stop within the process's grace, then start (clears an errored state)."""
        self.stop(name, wait=True)
        self.start(name, wait=False)

    def signal(self, name: str, sig: str) -> None:
        self.call("supervisor.signalProcess", name, sig)

    def shutdown(self) -> None:
        self.call("supervisor.shutdown")

    def _rpc(self, method: str, *args):
        """Raw call: faults pass through as xmlrpc.client.Fault for callers that expect some."""
        target = self._proxy()
        for part in method.split("."):
            target = getattr(target, part)
        try:
            return target(*args)
        except (OSError, http.client.HTTPException) as exc:
            error = SupervisorError(f"supervisord is not reachable at {self.socket_path}: {exc}")
            # nothing listens (or no socket): the call never reached supervisord
            error.unreached = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
            raise error from None


class StopUnanswered(SupervisorError):
    """A stop that reached supervisord, with no answer: whether it signalled the process is not known."""


class _TimeoutUnixConnection(http.client.HTTPConnection):
    """supervisor's own unix connection has no timeout; a hung supervisord must not hang the CLI."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock
