"""`emp-machine` and its subcommands. Parses, sets up logging, builds a Manifest and hands it on.

Heavy imports stay inside the commands: `emp-machine worker` starts for every worker process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from emp_machine.errors import EmpError, NoMachineRunning

USAGE_EXIT = 2


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
    render.add_argument("--gpus", type=int, help="lay out as if this many GPUs were present")
    render.set_defaults(func=cmd_render)

    ps = sub.add_parser("ps", help="list the processes of the running machine, like `pm2 list`")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(func=cmd_ps)

    restart = sub.add_parser("restart", help="gracefully restart a process (or `all`)")
    restart.add_argument("name")
    restart.set_defaults(func=cmd_restart)

    logs = sub.add_parser("logs", help="show a process's log")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=int, default=100)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.set_defaults(func=cmd_logs)

    submit = sub.add_parser("submit", help="submit a job exactly as the EMP API does; prints its id")
    submit.add_argument("--type", required=True, help="job type (service_required)")
    submit.add_argument("--payload", default="{}", help="JSON, or @file.json")
    submit.add_argument("--priority", type=int, default=50)
    submit.add_argument("--max-retries", type=int, default=3)
    submit.add_argument("--wait", action="store_true", help="follow progress to the end")
    submit.add_argument("--timeout", type=float, default=600)
    submit.set_defaults(func=cmd_submit)

    job = sub.add_parser("job", help="a job's timeline: claims, progress, failures, retries, the end")
    job.add_argument("job_id")
    job.add_argument("--json", action="store_true")
    job.set_defaults(func=cmd_job)

    stuck = sub.add_parser("stuck", help="jobs assigned or running whose lease or worker heartbeat expired")
    stuck.add_argument("--json", action="store_true")
    stuck.set_defaults(func=cmd_stuck)

    for p in (submit, job, stuck):
        p.add_argument("--redis", help="Redis URL (default: the running machine's, else the manifest's)")

    errors = sub.add_parser("errors", help="what errors occurred on the machine (from its log files)")
    errors.add_argument("--since", default="1h", help="how far back: 30m, 1h, 2d (default 1h)")
    errors.add_argument("--json", action="store_true")
    errors.add_argument("--machine", help="another machine: its health URL (http://host:9090) or its machine id "
                                          "(its health_url is read from its status messages in Redis)")
    errors.add_argument("--redis", help="Redis URL used to find --machine by id")
    errors.set_defaults(func=cmd_errors)

    trying = sub.add_parser("try", help="run one job through a connector directly (no Redis, no supervisor)")
    trying.add_argument("connector")
    trying.add_argument("--setting", "-s", action="append", default=[], metavar="KEY=VALUE",
                        help="a connector setting (VALUE parsed as JSON when it is JSON); repeatable")
    trying.add_argument("--payload", required=True, help="JSON, or @file.json")
    trying.add_argument("--output-dir", default="./emp-try-outputs")
    trying.set_defaults(func=cmd_try)

    machine_run = sub.add_parser("machine-run", help=argparse.SUPPRESS)
    machine_run.add_argument("resolved")
    machine_run.add_argument("--demo", action="store_true")
    machine_run.set_defaults(func=cmd_machine_run)

    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--index", type=int, required=True)
    worker.set_defaults(func=cmd_worker)

    for p in (run, demo, ps, restart, logs, worker, submit, job, stuck, errors):
        p.add_argument("--manifest", "-m", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# -- running a machine --------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from emp_machine.runtime import manifest as mf

    return _validate_then_exec(mf.load(Path(args.manifest) if args.manifest else mf.default_manifest()), demo=False)


def cmd_demo(args) -> int:
    from emp_machine.runtime import manifest as mf

    return _validate_then_exec(mf.load(Path(args.manifest) if args.manifest else mf.BUILTIN_DEFAULT), demo=True)


def _validate_then_exec(manifest, *, demo: bool) -> int:
    """Validate and lay out the machine here, write the resolved manifest, then replace this process with
    the lean machine runner (same pid, so signals and a container's PID 1 arrangement are unchanged).

    The runner reads the resolved values through runtime/view.py and never imports pydantic: a problem
    with the manifest or the hardware is reported here, before anything starts."""
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime.machine import resolved_manifest_path
    from emp_machine.runtime.view import View

    resolved = resolved_manifest_path(Path(manifest.machine.state_dir))
    data = json.loads(manifest.model_dump_json())
    data["source"] = manifest.source
    plan.build(View(data), hardware.probe(), resolved_manifest=resolved, environ=dict(os.environ))
    resolved.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(resolved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "emp_machine", "machine-run", str(resolved)] + (["--demo"] if demo else [])
    os.execv(sys.executable, argv)
    return 1  # not reached


def cmd_machine_run(args) -> int:
    """The running machine: resolved manifest in, no pydantic (see _validate_then_exec)."""
    import asyncio
    import threading

    from emp_machine import telemetry
    from emp_machine.runtime import demo, hardware, plan
    from emp_machine.runtime.logfile import RotatingTee
    from emp_machine.runtime.machine import Machine
    from emp_machine.runtime.view import View

    resolved = Path(args.resolved)
    manifest = View.load(resolved)
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
    workers = sum(1 for _ in manifest.workers)
    print(f"{args.path}: valid (machine {manifest.machine.id}, {len(manifest.services)} service(s), "
          f"{workers} worker group(s))")
    return 0


def cmd_render(args) -> int:
    from emp_machine.runtime import hardware, plan
    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime.identity import redact_url
    from emp_machine.runtime.machine import resolved_manifest_path
    from emp_machine.supervisor import config as svconfig

    manifest = mf.load(args.path)
    if args.gpus is not None:
        manifest = manifest.model_copy(update={"machine": manifest.machine.model_copy(update={"gpus": args.gpus})})
    from emp_machine.runtime.view import View

    the_plan = plan.build(View(json.loads(manifest.model_dump_json())), hardware.probe(), environ=dict(os.environ),
                          resolved_manifest=resolved_manifest_path(Path(manifest.machine.state_dir)))
    text = svconfig.render(list(the_plan.specs), the_plan.paths, parent_pid=os.getpid(),
                           machine_id=the_plan.machine_id, log_max_bytes=manifest.logs.max_size,
                           log_backups=manifest.logs.backups)
    print(_redact_config(text, redact_url))
    return 0


def _redact_config(text: str, redact_url) -> str:
    """Hide URL passwords and the values of secret-looking variables in a rendered config."""
    import re

    secret = re.compile(r'(\b[A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD|PASS|AUTH)[A-Z0-9_]*=)(["\'])[^"\']*\2')
    text = secret.sub(lambda m: f"{m.group(1)}{m.group(2)}***{m.group(2)}", text)
    return re.sub(r"\b(?:redis|rediss|https?)://[^\s\"',]+", lambda m: redact_url(m.group(0)), text)


# -- operating a running machine ----------------------------------------------------------------------------
def _target(args) -> dict:
    """The running machine's pointer document: from --manifest / $EMP_MANIFEST, else the only one running
    (under the per-user state root, or where the default manifest puts its state)."""
    from emp_machine.runtime import manifest as mf

    explicit = getattr(args, "manifest", None) or os.environ.get("EMP_MANIFEST")
    if explicit:
        state_dir = Path(mf.load(explicit).machine.state_dir)
        doc = mf.running_machine(state_dir)
        if doc is None:
            raise NoMachineRunning(f"no machine is running for {explicit} (looked in {state_dir / 'run'})")
        return doc
    machines = {m["socket"]: m for m in mf.running_machines()}
    default = mf.running_machine(Path(mf.load(mf.default_manifest()).machine.state_dir))
    if default is not None:
        machines[default["socket"]] = default
    if not machines:
        raise NoMachineRunning("no machine is running on this host; start one with "
                               "`emp-machine --manifest <file>`, or name its manifest with --manifest")
    if len(machines) > 1:
        names = ", ".join(f"{m['machine_id']} ({m['manifest']})" for m in machines.values())
        raise NoMachineRunning(f"{len(machines)} machines are running ({names}); choose one with --manifest")
    return next(iter(machines.values()))


def _control(doc: dict):
    from emp_machine.supervisor.control import Supervisor

    return Supervisor(doc["socket"])


def cmd_ps(args) -> int:
    import psutil

    doc = _target(args)
    rows = _control(doc).processes()
    trees = {}
    for row in rows:
        if row.pid:
            try:
                root = psutil.Process(row.pid)
                trees[row.name] = [root, *root.children(recursive=True)]
                for proc in trees[row.name]:
                    proc.cpu_percent(None)
            except psutil.Error:
                pass
    time.sleep(0.25)  # cpu_percent needs two samples; one short interval for the whole table
    table = []
    for row in rows:
        cpu, rss = 0.0, 0
        for proc in trees.get(row.name, []):
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                pass
        table.append({"name": row.name, "pid": row.pid or None, "state": row.state.lower(),
                      "uptime_s": round(row.uptime), "restarts": row.restarts, "cpu_percent": round(cpu, 1),
                      "memory_bytes": rss, "errored_reason": row.errored_reason or None})
    if args.json:
        print(json.dumps({"machine_id": doc["machine_id"], "processes": table}, indent=2))
        return 0
    from emp_machine.units import format_size

    print(f"machine {doc['machine_id']}  ({doc['manifest']})")
    header = f"{'NAME':<18} {'PID':>7}  {'STATE':<9} {'UPTIME':>8} {'RESTARTS':>8} {'CPU%':>6} {'MEMORY':>9}"
    print(header)
    for t in table:
        print(f"{t['name']:<18} {t['pid'] or '-':>7}  {t['state']:<9} {_ago(t['uptime_s']) if t['pid'] else '-':>8} "
              f"{t['restarts']:>8} {t['cpu_percent']:>6} {format_size(t['memory_bytes']) if t['pid'] else '-':>9}")
        if t["errored_reason"]:
            print(f"{'':<18} errored: {t['errored_reason']}")
    return 0


def _ago(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_restart(args) -> int:
    from emp_machine.supervisor.control import Supervisor

    doc = _target(args)
    control = _control(doc)
    names = [r.name for r in control.processes()]
    targets = [n for n in names if n != "redis"] if args.name == "all" else [args.name]
    for name in targets:
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; processes: {', '.join(names)}"
            raise EmpError(f"no process named {name}{hint}")
    for name in targets:
        Supervisor(doc["socket"], timeout=120).restart(name)
        print(f"restarted {name}")
    return 0


def cmd_errors(args) -> int:
    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime import queries
    from emp_machine.units import parse_duration

    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        raise EmpError(f"--since: {exc}") from None
    if args.machine:
        source = args.machine if args.machine.startswith(("http://", "https://")) else _health_url_of(args)
        rows = _remote_errors(source, args.since)
    else:
        try:
            logs_dir = Path(_target(args)["logs"])
        except NoMachineRunning:  # a stopped machine's logs are still worth reading
            state = mf.load(getattr(args, "manifest", None) or mf.default_manifest()).machine.state_dir
            logs_dir = Path(state) / "logs"
        source = str(logs_dir)
        rows = queries.recent_errors(logs_dir, since)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no errors in the last {args.since} ({source})")
        return 0
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["at"]))
        job = f" job={row['job_id']}" if row.get("job_id") else ""
        trace = f" trace={row['trace_id']}" if row.get("trace_id") else ""
        print(f"{when}Z {row['process']:<12} {row['event'] or '':<18} {row['message']}{job}{trace}")
    return 0


def _health_url_of(args) -> str:
    """A machine's health_url from its next status message (machines publish one every 10 s)."""
    from emp_machine.runtime.jobs import machine_status_channel

    client, _ = _store(args)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(machine_status_channel(args.machine))
    deadline = time.monotonic() + 12
    try:
        while time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1.0)
            if message and message.get("type") == "message":
                try:
                    url = json.loads(message["data"]).get("health_url")
                except (TypeError, ValueError):
                    continue
                if url:
                    return url
    finally:
        pubsub.close()
    raise EmpError(f"no status message from machine {args.machine} within 12 s: is it running and using this Redis?")


def _remote_errors(base_url: str, since: str) -> list:
    import urllib.error
    import urllib.parse
    import urllib.request

    url = f"{base_url.rstrip('/')}/errors?since={urllib.parse.quote(since)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EmpError(f"could not read errors from {url}: {exc}") from None


def cmd_logs(args) -> int:
    doc = _target(args)
    path = Path(doc["logs"]) / f"{args.name}.log"
    if not path.exists():
        available = sorted(p.stem for p in Path(doc["logs"]).glob("*.log"))
        raise EmpError(f"no log for {args.name} at {path}; logs: {', '.join(available) or 'none yet'}")
    for line in _tail(path, args.lines):
        sys.stdout.write(line)
    sys.stdout.flush()
    if args.follow:
        _follow(path)
    return 0


def _tail(path: Path, count: int) -> list[str]:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        end = fh.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= count:
            step = min(block, end)
            end -= step
            fh.seek(end)
            data = fh.read(step) + data
    lines = data.decode("utf-8", "replace").splitlines(keepends=True)
    return lines[-count:] if count > 0 else []


def _follow(path: Path) -> None:
    """Print lines as they are appended; reopen when supervisord rotates the file."""
    fh = open(path, "rb")
    fh.seek(0, os.SEEK_END)
    inode = os.fstat(fh.fileno()).st_ino
    while True:
        chunk = fh.read()
        if chunk:
            sys.stdout.write(chunk.decode("utf-8", "replace"))
            sys.stdout.flush()
            continue
        try:
            if os.stat(path).st_ino != inode or os.stat(path).st_size < fh.tell():
                fh.close()
                fh = open(path, "rb")
                inode = os.fstat(fh.fileno()).st_ino
                continue
        except FileNotFoundError:
            pass
        time.sleep(0.2)


# -- jobs -------------------------------------------------------------------------------------------------
def _store(args):
    """A sync JobStore on: --redis, else the running machine's Redis, else the manifest's redis.url."""
    import redis

    from emp_machine.runtime import manifest as mf
    from emp_machine.runtime.identity import redact_url
    from emp_machine.runtime.jobs import JobStore

    url = args.redis
    if not url:
        try:
            url = _target(args).get("redis_url")
        except NoMachineRunning:
            url = None
    if not url:
        manifest = mf.load(getattr(args, "manifest", None) or mf.default_manifest())
        url = manifest.redis.url
        if url == "embedded":
            raise NoMachineRunning("the manifest uses an embedded Redis and no machine is running: start the "
                                   "machine first, or pass --redis URL")
    client = redis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise EmpError(f"Redis at {redact_url(url)} is not reachable: {exc.__class__.__name__}") from None
    return client, JobStore(client)


def _payload(text: str):
    """--payload as JSON text or @file."""
    try:
        raw = Path(text[1:]).read_text(encoding="utf-8") if text.startswith("@") else text
        return json.loads(raw)
    except OSError as exc:
        raise EmpError(f"--payload file cannot be read: {exc}") from None
    except ValueError as exc:
        raise EmpError(f"--payload is not JSON: {exc}") from None


def cmd_try(args) -> int:
    import asyncio

    from emp_machine.connectors.trying import try_connector

    settings = {}
    for item in args.setting:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EmpError(f"--setting {item!r}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return asyncio.run(try_connector(args.connector, settings, _payload(args.payload), args.output_dir))


def cmd_submit(args) -> int:
    from emp_machine.runtime import queries

    payload = _payload(args.payload)
    from emp_machine.telemetry.context import new_span_id, new_trace_id

    client, store = _store(args)
    # Like an EMP API producer, start the job's trace here: the worker's job.execution continues it, and
    # `emp-machine job` can name the trace id to look up in the tracing backend.
    trace = {"job_trace_id": new_trace_id(), "job_span_id": new_span_id()}
    job_id = store.submit(args.type, payload, priority=args.priority, max_retries=args.max_retries, trace=trace)
    print(job_id)
    if not args.wait:
        return 0

    def bar(percent: float, message: str) -> None:
        filled = int(percent / 5)
        print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {percent:5.1f}% {message[:40]:<40}", end="", flush=True)

    job = queries.wait_for_end(client, store, job_id, bar, args.timeout)
    print()
    status = job.get("status", "unknown")
    print(f"{job_id}: {status}" + (f" ({job.get('error')})" if status == "failed" else ""))
    return 0 if status == "completed" else 1


def cmd_job(args) -> int:
    from emp_machine.runtime import queries

    _, store = _store(args)
    doc = queries.timeline(store, args.job_id)
    if doc is None:
        raise EmpError(f"no job {args.job_id} in Redis")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"job {doc['job_id']}  type {doc['service_required']}  status {doc['status']}  "
          f"retries {doc['retry_count']}/{doc['max_retries']}  total {queries.format_ms(doc['total_ms'])}")
    if doc["trace_id"]:
        print(f"trace {doc['trace_id']}")
    if doc["error"]:
        print(f"error {doc['error']}")
    if doc["durations"]:
        print("steps " + ", ".join(f"{name.removesuffix('_ms').replace('_', ' ')} {queries.format_ms(ms)}"
                                     for name, ms in doc["durations"].items()))
    print(f"{'AT (UTC)':<13} {'STEP':<14} {'+TIME':>9}  {'WORKER':<28} DETAIL")
    for step in doc["steps"]:
        print(f"{queries.format_at(step['at_ms']):<13} {step['event']:<14} "
              f"{queries.format_ms(step['since_previous_ms']):>9}  {step['worker_id']:<28} {step['detail']}")
    return 0


def cmd_stuck(args) -> int:
    from emp_machine.runtime import queries

    _, store = _store(args)
    rows = queries.stuck(store)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no stuck jobs")
        return 0
    print(f"{'JOB':<40} {'STATUS':<12} {'WORKER':<30} REASON")
    for row in rows:
        print(f"{row['job_id']:<40} {row['status']:<12} {row['worker_id']:<30} {row['reason']}")
    return 0
