"""`emp-machine` and its subcommands. Parses, sets up logging, builds a Manifest and hands it on.

Heavy imports stay inside the commands: `emp-machine worker` starts for every worker process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from emp_machine.errors import EmpError, ManifestError, ManifestProblem
from emp_machine.runtime import cli_ops as ops

USAGE_EXIT = 2
# Stop signals held from the start of `run` and `demo` until the runner has its handlers (_hold_stop_signals;
# Machine.run unblocks all of machine.SHUTDOWN_SIGNALS). Not SIGINT: Python's own handler takes it from the
# start (KeyboardInterrupt, exit 130), which also stops a validation that hangs (a GPU driver's probe).
HELD_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
MACHINE_LOCK = "machine.lock"  # in run/: held (flock) by the machine process for its whole life
# Where a shell points at a real queue: never the demo's Redis (its jobs would go there, its workers claim real ones)
DEMO_IGNORED_ENV = ("REDIS_URL", "HUB_REDIS_URL", "EMP_REDIS_URL", "EMP_REDIS__URL")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EmpError as exc:
        print(f"emp-machine: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`emp-machine job X | head`): quiet, as a command killed by SIGPIPE, and nothing
        # left for the interpreter's last flush of stdout to fail on again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _job_type(text: str) -> str:
    """An argparse type: a job type (service_required), which no worker claims when blank."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a job type is needed (the service_required a worker serves, e.g. "
                                         "simulation); got an empty one, which no worker would ever claim")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emp-machine", description="Boot and operate an EMP worker machine.")
    parser.add_argument("--manifest", "-m", help="machine manifest (default: $EMP_MANIFEST or the built-in "
                                                 "simulation manifest)")
    parser.set_defaults(func=cmd_run)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    run = sub.add_parser("run", help="boot the machine (the default command)")
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="boot the simulation machine with a private Redis")
    demo.set_defaults(func=cmd_demo)

    validate = sub.add_parser("validate", help="check a manifest and exit (0 valid, 2 invalid)")
    validate.add_argument("path")
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser("render", help="print the supervisord config the manifest gives (secrets hidden)")
    render.add_argument("path")
    render.add_argument("--gpus", type=_count, help="lay out as if this many GPUs were present")
    render.set_defaults(func=cmd_render)

    ps = sub.add_parser("ps", help="list the processes of the running machine, like `pm2 list`")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=ops.cmd_ps)

    restart = sub.add_parser("restart", help="gracefully restart a process, a service or worker group (each "
                             "instance), or `all`: every target at once, like `pm2 restart`")
    restart.add_argument("name")
    restart.set_defaults(func=ops.cmd_restart, rolling=False)

    reload = sub.add_parser("reload", help="the same, one process at a time (each stopped, then started, before "
                            "the next), like `pm2 reload`: the others keep working meanwhile")
    reload.add_argument("name")
    reload.set_defaults(func=ops.cmd_restart, rolling=True)

    logs = sub.add_parser("logs", help="show a process's log, or each instance's of a service or worker group")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=_count, default=100)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.set_defaults(func=ops.cmd_logs)

    submit = sub.add_parser("submit", help="submit a job exactly as the EMP API does; prints its id")
    submit.add_argument("--type", required=True, type=_job_type, help="job type (service_required)")
    submit.add_argument("--payload", default="{}", help="JSON, or @file.json")
    submit.add_argument("--priority", type=int, default=50)
    submit.add_argument("--max-retries", type=_count, default=3, help="a whole number, 0 or more (default 3)")
    submit.add_argument("--wait", action="store_true", help="follow progress to the end; exit 0 completed, "
                        "1 failed or cancelled, 124 still running at --timeout (the job goes on), 130 Ctrl-C")
    submit.add_argument("--timeout", type=float, default=600,
                        help="seconds --wait follows the job (default 600); a lost Redis is retried until then")
    submit.set_defaults(func=ops.cmd_submit)

    job = sub.add_parser("job", help="a job's timeline: claims, progress, failures, retries, the end")
    job.add_argument("job_id")
    job.add_argument("--json", action="store_true")
    job.set_defaults(func=ops.cmd_job)

    stuck = sub.add_parser("stuck", help="jobs assigned or running whose lease or worker heartbeat expired")
    stuck.add_argument("--json", action="store_true")
    stuck.set_defaults(func=ops.cmd_stuck)

    for p in (submit, job, stuck):
        p.add_argument("--redis", help="Redis URL (default: the running machine's, else the manifest's)")

    errors = sub.add_parser("errors", help="what errors occurred on the machine (from its log files)")
    errors.add_argument("--since", default="1h", help="how far back: 30m, 1h, 2d (default 1h)")
    errors.add_argument("--json", action="store_true")
    errors.add_argument("--machine", help="another machine: its health URL (http://host:9090) or its machine id "
                                          "(its health_url is read from its status messages in Redis)")
    errors.add_argument("--redis", help="Redis URL used to find --machine by id")
    errors.add_argument("--wait", default="12s", help="how long to wait for --machine's status message, which "
                                                     "gives its health URL (machines publish one every 10 s)")
    errors.set_defaults(func=ops.cmd_errors)

    telemetry = sub.add_parser("telemetry", help="what each process's telemetry buffer holds (read-only; also "
                                                 "while the machine runs)")
    where = telemetry.add_mutually_exclusive_group()
    where.add_argument("--manifest", "-m", default=argparse.SUPPRESS,
                       help="the machine's manifest (default: the running machine)")
    where.add_argument("--state-dir", help="the machine's state directory (machine.state_dir)")
    telemetry.add_argument("--process", help="only this process's buffer (machine, or a worker id)")
    telemetry.add_argument("--spans", type=_count, default=0, metavar="N", help="the last N pending spans")
    telemetry.add_argument("--logs", type=_count, default=0, metavar="N", help="the last N pending log records")
    telemetry.add_argument("--dead-letters", action="store_true", help="the batches a collector rejected")
    telemetry.add_argument("--json", action="store_true")
    telemetry.set_defaults(func=ops.cmd_telemetry)

    trying = sub.add_parser("try", help="run one job through a connector directly (no Redis, no supervisor)")
    trying.add_argument("connector")
    trying.add_argument("--setting", "-s", action="append", default=[], metavar="KEY=VALUE",
                        help="a connector setting (VALUE parsed as JSON when it is JSON); repeatable")
    trying.add_argument("--payload", required=True, help="JSON, or @file.json")
    trying.add_argument("--output-dir", default="./emp-try-outputs")
    trying.set_defaults(func=ops.cmd_try)

    # Internal commands: no help= at all, so that the command list leaves them out (help=SUPPRESS prints
    # "==SUPPRESS==" there)
    machine_run = sub.add_parser("machine-run")
    machine_run.add_argument("resolved")
    machine_run.add_argument("--demo", action="store_true")
    machine_run.add_argument("--lock-fd", type=int)
    machine_run.set_defaults(func=cmd_machine_run)

    worker = sub.add_parser("worker")
    worker.add_argument("--index", type=int, required=True)
    worker.set_defaults(func=cmd_worker)

    for p in (run, demo, ps, restart, reload, logs, worker, submit, job, stuck, errors):
        p.add_argument("--manifest", "-m", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# -- running a machine --------------------------------------------------------------------------------------
def _hold_stop_signals() -> None:
    """Block the stop signals until Machine.run has its handlers and unblocks them. A signal that finds no
    handler kills a process that has not set one up yet, and one sent to a container's PID 1 (no init in the
    image) is dropped by the kernel: a `docker stop` in the ~0.5 s of validation and imports before the runner's
    handlers was lost, and the platform's SIGKILL came at its timeout. A blocked signal stays pending, across
    the exec into the runner too, and is then taken as any stop is (a drain)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def cmd_run(args) -> int:
    _hold_stop_signals()  # first: importing the manifest's models takes a while
    from emp_machine.runtime import manifest as mf

    return _validate_then_exec(mf.load(Path(args.manifest) if args.manifest else mf.default_manifest()), demo=False)


def cmd_demo(args) -> int:
    _hold_stop_signals()  # first: importing the manifest's models takes a while
    from emp_machine.runtime import manifest as mf

    ignored = [name for name in DEMO_IGNORED_ENV if os.environ.get(name)]
    if ignored:
        print(f"demo | ignoring {', '.join(ignored)}: the demo runs on its own embedded Redis, never a shared one "
              "(`emp-machine run` uses them)", file=sys.stderr, flush=True)
    for name in DEMO_IGNORED_ENV:  # gone for the manifest and for the machine process it becomes
        os.environ.pop(name, None)
    return _validate_then_exec(mf.load(Path(args.manifest) if args.manifest else mf.BUILTIN_DEFAULT), demo=True)


def _validate_then_exec(manifest, *, demo: bool) -> int:
    """Validate and lay out the machine here, write the resolved manifest, then replace this process with
    the lean machine runner (same pid, so signals and a container's PID 1 arrangement are unchanged).

    The runner reads the resolved values through runtime/view.py and never imports pydantic: a problem
    with the manifest or the hardware is reported here, before anything starts."""
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime.machine import resolved_manifest_path
    from emp_machine.runtime.view import View

    # Every file of the machine and of what it starts (logs that may quote a job's error, telemetry buffers,
    # the resolved manifest, outputs) is its user's alone: supervisord and its programs inherit this mask
    # (supervisord ignores its own umask option when it does not daemonize).
    os.umask(os.umask(0o077) | 0o077)
    state_dir = Path(manifest.machine.state_dir)
    resolved = resolved_manifest_path(state_dir)
    # First: a machine already running on this state dir is refused before anything of its is rewritten
    lock_fd = _hold_machine_lock(manifest.source, state_dir, manifest.machine.id)
    _check_state_folders(manifest.source, state_dir)
    data = _resolved_data(manifest)
    plan.build(View(data), hardware.probe(), resolved_manifest=resolved, environ=dict(os.environ))
    _write_resolved(manifest.source, resolved, data)
    sys.stdout.flush()
    sys.stderr.flush()
    os.set_inheritable(lock_fd, True)  # the lock goes on with the runner this process becomes
    argv = [sys.executable, "-m", "emp_machine", "machine-run", str(resolved), "--lock-fd", str(lock_fd)]
    os.execv(sys.executable, argv + (["--demo"] if demo else []))
    return 1  # not reached


def _hold_machine_lock(source: str, state_dir: Path, machine_id: str) -> int:
    """Take run/machine.lock (flock) for this process's life, or refuse: one machine per state directory.
    Its pid and machine id go into the file, for the message a second start gets while it boots."""
    import errno
    import fcntl

    run = state_dir / "run"
    try:
        run.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(run / MACHINE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # the state directory cannot be made or written: say where and what to do
        raise _state_dir_error(source, run, exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise EmpError(_already_running(state_dir)) from None
        return fd  # a file system without flock: started unguarded, as before
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {machine_id}\n".encode(), 0)
    except OSError:  # a full disk: the write of run/manifest.json says so
        pass
    return fd


STATE_FOLDERS = ("logs", "outputs")  # written from the first second (the machine's log) and by every job


def _check_state_folders(source: str, state_dir: Path) -> None:
    """logs/ and outputs/ made and writable by this user, checked as run/ is: a file where the folder should be,
    or a folder of another user's, is a clear problem here instead of a traceback once the machine runs."""
    import errno

    for name in STATE_FOLDERS:
        path = state_dir / name
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except FileExistsError:  # something that is not a folder (a file, a link to one) holds the name
            raise ManifestError(source or "<manifest>", [ManifestProblem(
                "machine.state_dir", f"cannot use {path}: it is a file, not a folder",
                hint=f"move or remove {path}, or set machine.state_dir (or EMP_MACHINE__STATE_DIR) to another "
                     "directory")]) from None
        except OSError as exc:
            raise _state_dir_error(source, path, exc) from None
        if not os.access(path, os.W_OK | os.X_OK):
            denied = OSError(errno.EACCES, f"Permission denied (owned by uid {_owner(path)}, this user is uid "
                                           f"{os.getuid()})")
            raise _state_dir_error(source, path, denied)


def _owner(path: Path) -> str:
    try:
        return str(path.stat().st_uid)
    except OSError:
        return "?"


def _already_running(state_dir: Path) -> str:
    from emp_machine.runtime.manifest import running_machine

    doc = running_machine(state_dir) or {}
    pid, machine_id = doc.get("pid"), doc.get("machine_id")
    if not pid:  # still booting (no run/machine.json yet): the lock file says who
        try:
            pid, machine_id = ((state_dir / "run" / MACHINE_LOCK).read_text(encoding="utf-8").split() + ["", ""])[:2]
        except (OSError, ValueError):
            pass
    who = f"machine {machine_id}" if machine_id else "a machine"
    return (f"{who} is already running on {state_dir} (pid {pid or 'unknown'}); stop it first (Ctrl-C in its "
            f"terminal, or kill -TERM {pid or '<pid>'}), or give this one another machine.state_dir "
            "(EMP_MACHINE__STATE_DIR)")


def _write_resolved(source: str, resolved: Path, data: dict) -> None:
    """run/manifest.json whole or not at all (the workers read it at each start): written beside, renamed over."""
    import contextlib

    tmp = resolved.with_name(f".{resolved.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, resolved)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _state_dir_error(source, resolved, exc) from None


def _state_dir_error(source: str, path: Path, exc: OSError) -> ManifestError:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = (f"free space on the disk that holds {path.parent}, or set machine.state_dir (or "
                "EMP_MACHINE__STATE_DIR) to a directory on another disk")
    else:
        hint = "set machine.state_dir (or EMP_MACHINE__STATE_DIR) to a directory this user can write"
    return ManifestError(source or "<manifest>", [ManifestProblem(
        "machine.state_dir", f"cannot write {path}: {exc.strerror or exc}", hint=hint)])


def _resolved_data(manifest) -> dict:
    """The validated manifest as the plain data the runner and workers read (run/manifest.json)."""
    data = json.loads(manifest.model_dump_json())
    data["source"] = manifest.source
    return data


def cmd_machine_run(args) -> int:
    """The running machine: resolved manifest in, no pydantic (see _validate_then_exec)."""
    import asyncio
    import threading

    from opentelemetry import trace as otel_trace

    from emp_machine import telemetry
    from emp_machine.runtime import demo, hardware, identity, plan
    from emp_machine.runtime.logfile import RotatingTee
    from emp_machine.runtime.machine import Machine
    from emp_machine.runtime.view import View
    from emp_machine.telemetry.redact import set_secret_values

    resolved = Path(args.resolved)
    manifest = View.load(resolved)
    # Masked exactly in every record of this process (the services' output it ships among them): their
    # credential env values, the Redis URL's, the OTLP headers', the health token, the workers' settings'.
    set_secret_values(identity.machine_secrets(manifest, os.environ))
    if args.lock_fd is not None:  # run/machine.lock, taken before the exec: no child of ours inherits it
        os.set_inheritable(args.lock_fd, False)
    else:  # started directly: one machine per state directory all the same
        _hold_machine_lock(manifest.source, Path(manifest.machine.state_dir), manifest.machine.id)
    # The token stays out of every file: read from the variable the manifest names, as load() did.
    token = os.environ.get(manifest.health.token_env, "").strip() or None
    hw = hardware.probe()
    the_plan = plan.build(manifest, hw, resolved_manifest=resolved, environ=dict(os.environ))
    state = Path(manifest.machine.state_dir)
    stream = RotatingTee(the_plan.paths.log_file("machine"), manifest.logs.max_size, manifest.logs.backups)
    tel = telemetry.setup(manifest.telemetry, machine_id=manifest.machine.id, service_type="machine",
                          region=manifest.machine.region or None, buffer_path=state / "telemetry" / "machine.db",
                          process_share=1 / (len(the_plan.workers) + 1), stream=stream)
    tel.install_logging()
    # OTel's global tracer is this process's one (as each worker's is its own): set once, at the entry point.
    otel_trace.set_tracer_provider(tel.tracer_provider)
    # Buffer files of processes not in this plan (workers scaled down, an earlier machine id): shipped with
    # their own resource and removed, in the background (stopped by tel.shutdown, the rest kept for next boot).
    tel.adopt_orphan_buffers(worker.worker_id for worker in the_plan.workers)
    stop = threading.Event()
    if args.demo:
        def say(line: str) -> None:
            print(f"demo | {line}", file=sys.stderr, flush=True)

        threading.Thread(target=demo.run, args=(state, say, stop), daemon=True, name="demo").start()
    try:
        return asyncio.run(Machine(manifest, the_plan, hw, tel, health_token=token).run())
    finally:
        stop.set()
        tel.shutdown(timeout=5)
        stream.close()


def cmd_worker(args) -> int:
    from emp_machine.runtime import worker

    return worker.run(Path(args.manifest), args.index, os.environ)


# -- manifests ----------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from emp_machine.runtime import manifest as mf

    manifest = mf.load(args.path)
    if (problem := mf.socket_problem(manifest, args.path)) is not None:
        raise problem
    workers = sum(1 for _ in manifest.workers)
    print(f"{args.path}: valid (machine {manifest.machine.id}, {len(manifest.services)} service(s), "
          f"{workers} worker group(s))")
    return 0


def cmd_render(args) -> int:
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime.machine import resolved_manifest_path
    from emp_machine.supervisor import config as svconfig

    manifest = mf.load(args.path)
    if args.gpus is not None:
        manifest = manifest.model_copy(update={"machine": manifest.machine.model_copy(update={"gpus": args.gpus})})
    from emp_machine.runtime.view import View

    the_plan = plan.build(View(_resolved_data(manifest)), hardware.probe(), environ=dict(os.environ),
                          resolved_manifest=resolved_manifest_path(Path(manifest.machine.state_dir)))
    text = svconfig.render(list(the_plan.specs), the_plan.paths, parent_pid=os.getpid(),
                           machine_id=the_plan.machine_id, log_max_bytes=manifest.logs.max_size,
                           log_backups=manifest.logs.backups)
    print(_redact_config(text, _environment_secrets(args.path, os.environ)))
    return 0


# Names render treats as secret: the telemetry's rule (telemetry.redact.secret_key) and, shown to a person
# where over-masking costs nothing, any name holding one of these words (DB_PASS, BASIC_AUTH, MY_KEY).
_SECRET_WORDS = r"(?i)key|token|pass|auth"


def _secret_name(name: str) -> bool:
    import re

    from emp_machine.telemetry.redact import secret_key

    return secret_key(name) or re.search(_SECRET_WORDS, name) is not None


def _environment_secrets(path, environ) -> list[str]:
    """Values render must not show wherever they land (a command line, a setting): those of the variables
    with secret-like names that the manifest takes with ${VAR} or that override it (EMP_*)."""
    from emp_machine.runtime.manifest import _VAR

    try:
        names = {m.group(1) for m in _VAR.finditer(Path(path).read_text(encoding="utf-8")) if m.group(1)}
    except (OSError, UnicodeDecodeError):
        names = set()
    names |= {name for name in environ if name.startswith("EMP_")}
    return [environ[name] for name in names if _secret_name(name) and len(environ.get(name, "")) >= 4]


def _redact_config(text: str, secrets: list[str] = ()) -> str:
    """Hide URL passwords and the values of secret-looking variables in a rendered config: each
    `environment = K="v",K2='v2'` pair whose name is secret (_secret_name, any case) has its value shown as
    ***; other values lose secret-shaped parts."""
    import re

    from emp_machine.runtime.identity import redact_urls
    from emp_machine.telemetry.redact import redact_text

    # a credential given as a command-line flag inside a value: --token X, --api-key=X
    flag = re.compile(r"(?i)(--?[\w-]*(?:key|token|secret|pass|auth)[\w-]*)([= ])([^\s\"',]+)")
    # supervisord's values: quoted with " or ', holding the other quote but never their own (supervisor/config.py)
    pair = re.compile(r"""([^=,\s]+)=("[^"]*"|'[^']*')(,|$)""")

    def environment(line: str) -> str:
        head, sep, pairs = line.partition("=")
        out, at = [], 0
        while at < len(pairs):
            lead = len(pairs) - len(pairs[at:].lstrip(" "))
            m = pair.match(pairs, lead)
            if m is None:  # not a shape this knows: nothing of the rest is shown
                out.append(pairs[at:lead] + "***")
                break
            name, quoted, comma = m.groups()
            quote, value = quoted[0], quoted[1:-1]
            if _secret_name(name):
                value = "***"
            else:
                value = flag.sub(lambda f: f"{f.group(1)}{f.group(2)}***", redact_text(value))
            out.append(f"{pairs[at:lead]}{name}={quote}{value}{quote}{comma}")
            at = m.end()
        return head + sep + "".join(out)

    text = "\n".join(environment(line) if line.startswith("environment") and "=" in line else line
                     for line in text.split("\n"))
    text = redact_urls(text)
    for secret in sorted(set(secrets), key=len, reverse=True):  # the longest first: one may hold another
        text = text.replace(secret, "***")
    return text
