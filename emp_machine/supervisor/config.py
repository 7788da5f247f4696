"""Process specs -> supervisord.conf: a private unix socket, one program per process, no TCP control port.

Every program is rendered with `autostart=false` and `autorestart=false`: the machine decides when each one
starts (services first, workers once their service is healthy) and `plugin.py` decides restarts.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from emp_machine.errors import SupervisorError
from emp_machine.supervisor.policy import RestartPolicy

SOCKET_NAME = "supervisor.sock"
CONF_NAME = "supervisord.conf"
POLICY_NAME = "policy.json"
PID_NAME = "supervisord.pid"
MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL

STOP_SIGNALS = ("TERM", "INT", "QUIT", "HUP", "KILL", "USR1", "USR2")


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process, already expanded from the manifest (instance, index, port are resolved)."""

    name: str
    argv: tuple[str, ...]
    kind: str  # "service" | "worker" | "redis"
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    stop_signal: str = "TERM"
    stop_grace: float = 30.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    memory_limit: int | None = None
    priority: int = 500  # supervisord stops higher numbers first on its own shutdown


@dataclass(frozen=True)
class Paths:
    """Where one machine keeps its runtime files. `run` is private (0700): socket, config, pid."""

    state: Path

    @property
    def run(self) -> Path:
        return self.state / "run"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def socket(self) -> Path:
        return self.run / SOCKET_NAME

    @property
    def conf(self) -> Path:
        return self.run / CONF_NAME

    @property
    def policy(self) -> Path:
        return self.run / POLICY_NAME

    @property
    def pidfile(self) -> Path:
        return self.run / PID_NAME

    def log_file(self, process_name: str) -> Path:
        return self.logs / f"{process_name}.log"


def _escape(value: str) -> str:
    """supervisord expands %(name)s in most values: a literal percent must be doubled."""
    return value.replace("%", "%%")


def env_value_problem(value: str) -> str | None:
    """Why supervisord could not carry this environment value, or None.

    supervisord parses `environment=` with a non-POSIX shlex: a value is quoted with ' or " and cannot
    escape either, and it strips quote characters from both ends. So a value may not hold both kinds of
    quote, may not begin or end with one, and (being one line of an ini file) may not hold a line break.
    """
    if "'" in value and '"' in value:
        return "holds both ' and \" quote characters"
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        return "begins or ends with a quote character"
    if any(ch in value for ch in "\r\n\0"):
        return "holds a line break or NUL"
    if _INLINE_COMMENT.search(value):
        return COMMENT_PROBLEM
    return None


# supervisord reads its config with inline_comment_prefixes=(';', '#'): a ';' or '#' right after whitespace
# (or after the '= ' of the line) starts a comment, whatever quotes are around it, and nothing escapes it.
_INLINE_COMMENT = re.compile(r"\s[;#]")
COMMENT_PROBLEM = "holds ';' or '#' after a space, which supervisord's config reads as the start of a comment"
COMMENT_FIX = ("drop the space before the ';' or '#', or move the text into a file or script the process "
               "reads; supervisord has no way to escape it")


def config_value_problem(value: str) -> str | None:
    """Why `value` cannot stand unquoted as one value of supervisord.conf (a command line, a directory, the
    identifier, a path), or None: one line, no inline comment, no whitespace at the ends (dropped)."""
    if any(ord(ch) < 32 and ch != "\t" or ch in "\x7f\x85\u2028\u2029" for ch in value):
        return "holds a control character (a line break?)"
    if value[:1] in (";", "#") or _INLINE_COMMENT.search(value):
        return ("begins with ';' or '#'" if value[:1] in (";", "#") else "holds ';' or '#' after a space") + \
            ", which supervisord's config reads as the start of a comment"
    if value != value.strip():
        return "begins or ends with whitespace, which supervisord's config drops"
    return None


SUPERVISORD_MINFDS = 1024  # supervisord's defaults for minfds and minprocs
SUPERVISORD_MINPROCS = 200


def _within_hard_limit(name: str, wanted: int) -> int:
    """`wanted`, or the hard limit `name` (resource.RLIMIT_*) where that is lower: supervisord raises the
    soft limit to minfds/minprocs itself and exits with an error where the hard one is below."""
    import resource

    try:
        hard = resource.getrlimit(getattr(resource, name))[1]
    except (AttributeError, OSError, ValueError):
        return wanted
    return wanted if hard == resource.RLIM_INFINITY or hard >= wanted else max(1, hard)


def _env_value(value: str) -> str:
    quote = "'" if '"' in value else '"'
    return quote + _escape(value) + quote


def render(specs: list[ProcessSpec], paths: Paths, *, parent_pid: int, machine_id: str,
           log_max_bytes: int, log_backups: int) -> str:
    """The whole supervisord.conf text. Secrets in env values appear here: the file lives in `run` (0700)."""
    lines = [
        "; rendered by emp-machine; do not edit, it is written anew at every boot",
        "[unix_http_server]",
        f"file = {_escape(str(paths.socket))}",
        "chmod = 0700",
        "",
        "[supervisord]",
        "nodaemon = true",
        "silent = true",
        f"identifier = {_escape(machine_id)}",
        f"logfile = {_escape(str(paths.logs / 'supervisord.log'))}",
        "logfile_maxbytes = 10MB",
        "logfile_backups = 2",
        "loglevel = info",
        # Logs, telemetry databases and metric snapshots can quote services' answers: owner-only files. This
        # one counts only where supervisord daemonizes (nodaemon ignores it); each program's umask below is
        # what its process gets.
        "umask = 077",
        f"pidfile = {_escape(str(paths.pidfile))}",
        f"childlogdir = {_escape(str(paths.logs))}",
        # supervisord refuses to start under a hard limit below these (its defaults 1024 and 200), with a
        # message about a config file the user never wrote: ask for no more than the host allows.
        f"minfds = {_within_hard_limit('RLIMIT_NOFILE', SUPERVISORD_MINFDS)}",
        f"minprocs = {_within_hard_limit('RLIMIT_NPROC', SUPERVISORD_MINPROCS)}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[rpcinterface:emp]",
        "supervisor.rpcinterface_factory = emp_machine.supervisor.plugin:make_rpcinterface",
        f"policy_file = {_escape(str(paths.policy))}",
        f"parent_pid = {parent_pid}",
        "",
        "[supervisorctl]",
        f"serverurl = unix://{_escape(str(paths.socket))}",
    ]
    for spec in specs:
        for what, value in (("command", shlex.join(spec.argv)), ("directory", spec.cwd or "")):
            if (problem := config_value_problem(value)) is not None:  # validation names the manifest field
                raise SupervisorError(f"the {what} of {spec.name} {problem}")
        lines += [
            "",
            f"[program:{spec.name}]",
            f"command = {_escape(shlex.join(spec.argv))}",
            "autostart = false",
            "autorestart = false",
            "startsecs = 0",
            "startretries = 3",
            "exitcodes = 0",
            "umask = 077",  # what it creates (telemetry/*.db, metrics/*.json) is its owner's alone
            f"stopsignal = {spec.stop_signal}",
            f"stopwaitsecs = {max(1, math.ceil(spec.stop_grace))}",  # whole seconds, never shorter than asked
            "stopasgroup = true",
            "killasgroup = true",
            f"priority = {spec.priority}",
            "redirect_stderr = true",
            f"stdout_logfile = {_escape(str(paths.log_file(spec.name)))}",
            f"stdout_logfile_maxbytes = {log_max_bytes}",
            f"stdout_logfile_backups = {log_backups}",
        ]
        if spec.cwd:
            lines.append(f"directory = {_escape(spec.cwd)}")
        if spec.env:
            for key, val in spec.env.items():
                if (problem := env_value_problem(val)) is not None:
                    raise SupervisorError(f"environment variable {key} of {spec.name} {problem}")
            pairs = ",".join(f"{key}={_env_value(val)}" for key, val in sorted(spec.env.items()))
            lines.append(f"environment = {pairs}")
    return "\n".join(lines) + "\n"


def policy_document(specs: list[ProcessSpec]) -> str:
    return json.dumps({spec.name: spec.restart.to_dict() for spec in specs}, indent=2, sort_keys=True)


def write(specs: list[ProcessSpec], paths: Paths, **render_args) -> None:
    """Create the private directories and write the config and the policy file, both 0600."""
    if len(str(paths.socket)) > MAX_UNIX_SOCKET_PATH:
        raise SupervisorError(
            f"the supervisor socket path {paths.socket} is {len(str(paths.socket))} characters, over the "
            f"unix limit of {MAX_UNIX_SOCKET_PATH}: set machine.state_dir to a shorter directory"
        )
    paths.state.mkdir(parents=True, exist_ok=True)
    paths.run.mkdir(mode=0o700, exist_ok=True)
    paths.run.chmod(0o700)
    paths.logs.mkdir(exist_ok=True)
    for target, text in ((paths.conf, render(specs, paths, **render_args)), (paths.policy, policy_document(specs))):
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        tmp.replace(target)

