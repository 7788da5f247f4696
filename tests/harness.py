"""Run a real machine (emp-machine in its own process, real supervisord) and watch it, with deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from emp_machine.errors import SupervisorError
from emp_machine.supervisor.control import Supervisor


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {message}")
        time.sleep(interval)


class RunningMachine:
    def __init__(self, manifest: Path, state_dir: Path, env: dict[str, str]):
        self.manifest = manifest
        self.state_dir = state_dir
        self.log_path = state_dir / "machine.out"
        self.env = env
        state_dir.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "emp_machine", "--manifest", str(manifest)],
                                     stdout=self._out, stderr=subprocess.STDOUT, env=env)
        self.control = Supervisor(state_dir / "run" / "supervisor.sock")

    # -- observation -------------------------------------------------------------------------------------
    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"message": line, "raw": True})
        return out

    def event(self, message: str, **match) -> dict | None:
        for ev in self.events():
            if ev.get("message") == message and all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None

    def wait_event(self, message: str, timeout: float = 15.0, **match) -> dict:
        return wait_for(lambda: self.event(message, **match) or self._dead(message), timeout,
                        message=f"machine log event {message} {match or ''}\n{self.tail()}")

    def _dead(self, waiting_for: str):
        if self.proc.poll() is not None:
            raise AssertionError(f"machine exited ({self.proc.returncode}) while waiting for {waiting_for}:\n"
                                 f"{self.tail()}")
        return None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def processes(self) -> dict:
        return {row.name: row for row in self.control.processes()}

    def process(self, name: str):
        """The process row, or None while supervisord is not (yet) answering; AssertionError with the machine's
        log once the machine has exited (a wait on it would time out saying nothing of why)."""
        try:
            return self.processes().get(name)
        except SupervisorError:
            return self._dead(f"process {name}")

    def wait_ready(self, timeout: float = 20.0) -> dict:
        return self.wait_event("machine_ready", timeout)

    def log_of(self, process: str) -> str:
        path = self.state_dir / "logs" / f"{process}.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "emp_machine", *args, "--manifest", str(self.manifest)],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    # -- control -----------------------------------------------------------------------------------------
    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"machine did not exit within {timeout}s:\n{self.tail()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def write_manifest(path: Path, body: str, state_dir: Path, redis_url: str) -> Path:
    """A test manifest: the given sections plus a private state dir and the test Redis (or embedded)."""
    text = textwrap.dedent(body).strip() + "\n"
    def has(section: str) -> bool:  # a top-level key (a service's own `health:` check is not the section)
        return re.search(rf"^{section}:", text, re.M) is not None

    if not has("machine"):
        text = f"machine:\n  type: test\n  id: test-{state_dir.name}\n  state_dir: {state_dir}\n" + text
    if not has("health"):  # never the real :9090 in tests: a free port, read from run/machine.json
        text += "health:\n  port: 0\n"
    if not has("redis"):
        text += f"redis:\n  url: {redis_url}\n"
    path.write_text(text, encoding="utf-8")
    return path


# What a developer's shell may hold for a real deployment (the shared Redis, a machine or worker identity,
# Railway's variables, a collector, EMP_* overrides): never handed to what the tests start, nor read by the
# code they run in-process (conftest.py removes them from os.environ for the session). Tests that want one
# pass it explicitly. Test knobs (EMP_HYPOTHESIS_EXAMPLES) stay.
DEPLOYMENT_VARIABLES = frozenset({"REDIS_URL", "HUB_REDIS_URL", "MACHINE_ID", "WORKER_ID", "WORKER_GROUP", "PORT"})
DEPLOYMENT_PREFIXES = ("RAILWAY_", "OTEL_", "EMP_")
TEST_KNOBS = frozenset({"EMP_HYPOTHESIS_EXAMPLES"})


def deployment_variable(name: str) -> bool:
    return name not in TEST_KNOBS and (name in DEPLOYMENT_VARIABLES or name.startswith(DEPLOYMENT_PREFIXES))


def machine_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not deployment_variable(k)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0): count it as gone
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def health_base(machine: RunningMachine, timeout: float = 20.0) -> str:
    """http://127.0.0.1:<port> of the machine's health server (port 0 in tests: read from run/machine.json)."""
    pointer = machine.state_dir / "run" / "machine.json"

    def port():
        machine._dead("run/machine.json")
        try:
            return json.loads(pointer.read_text(encoding="utf-8")).get("health_port")
        except (OSError, ValueError):
            return None
    return f"http://127.0.0.1:{wait_for(port, timeout, message='the health port in run/machine.json')}"


def http(url: str, method: str = "GET", headers: dict | None = None, timeout: float = 5.0):
    """(status, headers, body bytes) of one request; HTTP errors are answers, not exceptions."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method=method, headers=headers or {},
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def wait_healthy(base: str, timeout: float, message: str = "the machine healthy") -> None:
    """Wait for /health 200; at the deadline, fail saying what /health answered last (its reasons)."""
    last = []

    def healthy() -> bool:
        last[:] = [http(base + "/health")]
        return last[0][0] == 200
    try:
        wait_for(healthy, timeout, message=message)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: /health answered {last[0][0]} {last[0][2][:1500]!r}") from None


def http_json(url: str, method: str = "GET", headers: dict | None = None):
    status, _, body = http(url, method, headers)
    return status, json.loads(body)


# -- worker processes without a machine ---------------------------------------------------------------------
class WorkerProcs:
    """Real `emp-machine worker` processes started the way supervisord starts them, without a machine.

    The manifest text is loaded and laid out by `plan.build`, so each process gets exactly the argv and
    environment the machine would give it (MACHINE_ID, WORKER_ID, WORKER_GROUP, REDIS_URL, ...). Tests
    kill, stop and restart them by index; `close()` kills what is left.
    """

    def __init__(self, body: str, state_dir: Path, redis_url: str, machine_id: str = "wt",
                 environ: dict[str, str] | None = None):
        from emp_machine.runtime import hardware, plan
        from emp_machine.runtime import manifest as mf

        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        text = (f"machine:\n  type: test\n  id: {machine_id}\n  state_dir: {state_dir}\n"
                f"redis:\n  url: {redis_url}\n" + textwrap.dedent(body).strip() + "\n")
        self.manifest = mf.loads(text, environ={})
        resolved = state_dir / "manifest.json"
        resolved.write_text(self.manifest.model_dump_json(), encoding="utf-8")
        self.plan = plan.build(self.manifest, hardware.probe(), resolved_manifest=resolved,
                               environ={**os.environ, **(environ or {})})
        self.specs = [s for s in self.plan.specs if s.kind == "worker"]
        self.ids = [w.worker_id for w in self.plan.workers]
        self.procs: dict[int, subprocess.Popen] = {}
        self._logs: dict[int, object] = {}

    def start(self, *indexes: int) -> "WorkerProcs":
        for i in indexes or range(len(self.specs)):
            spec = self.specs[i]
            log = open(self.log_path(i), "ab")
            self._logs[i] = log
            self.procs[i] = subprocess.Popen(list(spec.argv), env=dict(spec.env), stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_path(self, i: int) -> Path:
        return self.state_dir / f"worker-{i}.log"

    def log(self, i: int) -> str:
        path = self.log_path(i)
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def wait_up(self, client, *indexes: int, timeout: float = 20.0) -> None:
        """Until each worker logged `worker.spawned` (registered and subscribed to job_submitted)."""
        for i in indexes or tuple(self.procs):
            wait_for(lambda: '"worker.spawned"' in self.log(i) or self._dead(i), timeout,
                     message=f"worker {i} to start\n{self.log(i)[-3000:]}")

    def _dead(self, i: int):
        proc = self.procs[i]
        if proc.poll() is not None:
            raise AssertionError(f"worker {i} exited ({proc.returncode}):\n{self.log(i)[-3000:]}")
        return None

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def wait_exit(self, i: int, timeout: float = 15.0) -> int:
        try:
            return self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {i} did not exit in {timeout}s:\n{self.log(i)[-3000:]}") from None

    @contextlib.contextmanager
    def running(self, client, timeout: float = 20.0):
        """Started and registered for the block (a module fixture's `with procs.running(client): yield procs`),
        killed after it."""
        self.start()
        try:
            self.wait_up(client, timeout=timeout)
            yield self
        finally:
            self.close()

    def close(self) -> None:
        for i, proc in self.procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self._logs.values():
            log.close()


class Messages:
    """Every pub/sub message on some channels, collected by a thread from before the test acts."""

    def __init__(self, client, *channels: str):
        import threading

        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(*channels)
        self.seen: list[tuple[str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.pubsub.get_message(timeout=0.1)
            except Exception:  # noqa: BLE001 - the server went away (Redis restart tests): stop collecting
                return
            if msg and msg.get("type") == "message":
                try:
                    body = json.loads(msg["data"])
                except ValueError:
                    body = {"raw": msg["data"]}
                self.seen.append((msg["channel"], body))

    def of(self, channel: str, **match) -> list[dict]:
        return [b for c, b in list(self.seen) if c == channel and all(b.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        try:
            self.pubsub.close()
        except Exception:  # noqa: BLE001
            pass
