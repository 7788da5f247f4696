"""The machine manifest: pydantic models, YAML loading with line numbers, ${VAR} interpolation, env overrides.

This is the one module that reads the process environment (STYLE.md section 4): `load()` resolves
everything that depends on it (interpolation, `EMP_*` overrides, `REDIS_URL`, the machine id, the state
directory) and hands back a frozen `Manifest` that the rest of the code passes down.

Every problem becomes a `ManifestProblem` naming the dotted field path, the YAML line when known, what was
expected and, for misspelt names, the closest valid one. `load()` raises one `ManifestError` listing them all.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import shlex
import socket
import string
import sys
import typing
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from emp_machine.errors import ManifestError, ManifestProblem
from emp_machine.runtime import identity
from emp_machine.runtime.hardware import MAX_GPUS
from emp_machine.runtime.resp import redis_url_db
from emp_machine.supervisor.config import (COMMENT_FIX, MAX_UNIX_SOCKET_PATH, STOP_SIGNALS, Paths, config_value_problem,
                                           env_value_problem)
from emp_machine.telemetry.config import TelemetryConfig, apply_otel_env
from emp_machine.telemetry.urls import http_url_problem, url_problem
from emp_machine.units import ByteSize, Duration

ENV_PREFIX = "EMP_"
NAME_PATTERN = r"[a-z][a-z0-9_-]{0,39}"  # whole names (re.fullmatch: "$" would let a final "\n" by)
RESERVED_NAMES = {"worker", "redis", "supervisord", "machine"}
SERVICE_PLACEHOLDERS = {"index", "port", "gpu", "machine_id", "name"}
WORKER_PLACEHOLDERS = {"index", "machine_id", "worker_id", "service_port", "service_index", "name"}
MAX_LEASE_S = 600.0  # a longer lease only leaves a dead worker's job stuck longer: renewal keeps long jobs
_JOB_TYPES_FIX = ("remove it; list the job types the worker serves in workers.<group>.job_types, which defaults "
                  "to the connector's name")
# Capability keys the worker fills itself (message, hint). A manifest value would replace the worker's own:
# its claims would run under an id none of its writes own, or it would be woken for other job types than it
# claims (and claim ones its connector does not serve).
RESERVED_CAPABILITIES = {
    "worker_id": ("the worker sets its own worker_id: jobs claimed under another id are not its own, its "
                  "updates to them are refused and each job is re-queued when its lease runs out, again and again",
                  "remove it; worker ids are <machine id>-worker-<n>, so set machine.id or MACHINE_ID to change them"),
    "machine_id": ("the worker sets machine_id itself, from machine.id",
                   "remove it; set machine.id or the MACHINE_ID variable to name the machine"),
    "services": ("the worker fills services from the job types it serves; another list here would part the jobs "
                 "it is woken for from the ones it claims", _JOB_TYPES_FIX),
    "job_service_required_map": ("the worker fills job_service_required_map from the job types it serves; another "
                                 "list here would part the jobs it is woken for from the ones it claims",
                                 _JOB_TYPES_FIX),
}



class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineSection(_Model):
    id: str = Field("", description="stable machine id; empty: MACHINE_ID, else Railway replica, else host name")
    type: str = Field("generic", pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$", description="machine type, e.g. comfyui")
    region: str = ""
    gpus: Union[Literal["auto"], Annotated[int, Field(ge=0, le=MAX_GPUS)]] = Field(
        "auto", description="GPU count: 'auto' asks the NVIDIA driver (none found is 0)")
    state_dir: str = Field("", description="runtime files (socket, logs, embedded Redis); empty: per-user default")


def _redis_url_options_problem(url: str) -> str | None:
    """What in a Redis URL's db or TLS options the machine and its workers would read differently or fail on:
    redis-py (workers, CLI) takes a path that is no number as db 0, and fails at its first command on a ?db=
    that is none or an unknown ssl_cert_reqs; the machine failed at boot with a traceback."""
    parts = urlsplit(url)
    path = unquote(parts.path).replace("/", "")
    if parts.scheme != "unix" and path and not path.isdigit():
        return f"has a path that is not a db number ({parts.path!r}): use /0, /1, ... or leave it out"
    try:
        if redis_url_db(url) < 0:
            return "selects a negative db"
    except ValueError as exc:
        return str(exc)
    query = parse_qs(parts.query)
    if parts.scheme != "rediss" and (tls := sorted(name for name in query if name.startswith("ssl_"))):
        # redis-py hands them to its plain connection, which refuses them at the first command: every worker
        # crash-looped while the machine, which ignored them, said Redis was reachable
        return f"has TLS options ({', '.join(tls)}) but is not rediss://: use rediss:// for TLS, or drop them"
    reqs = query.get("ssl_cert_reqs")
    if reqs and reqs[0] not in ("none", "optional", "required"):
        return f"has ssl_cert_reqs={reqs[0]!r}: it must be none, optional or required"
    return None


class RedisSection(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)  # a URL carries passwords

    url: str = Field("embedded", description="redis://... or 'embedded' for a private server run by the machine")

    @field_validator("url")
    @classmethod
    def _url_form(cls, value: str) -> str:
        if value != "embedded" and not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("expected 'embedded' or a URL starting with redis://, rediss:// or unix://")
        if value.startswith(("redis://", "rediss://")) and (problem := url_problem(value)):
            raise ValueError(f"the Redis URL {problem}")
        if value != "embedded" and (problem := _redis_url_options_problem(value)):
            raise ValueError(f"the Redis URL {problem}")
        return value


class HealthSection(_Model):
    host: str = "0.0.0.0"
    port: int = Field(9090, ge=0, le=65535, description="0: pick a free port (written to run/machine.json)")
    public_url: str = Field("", description="URL the monitor reaches :9090 at; empty: the Railway public "
                                            "domain when there is one, else this host's name")
    token_env: str = Field("EMP_HEALTH_TOKEN", description="environment variable holding the bearer token")
    cors_origins: tuple[str, ...] = Field((), description="origins allowed to read from a browser ('*': any)")
    # Filled by load() from the variable named by token_env; never written out, never set from YAML.
    token: SecretStr | None = Field(None, exclude=True, repr=False)

    @field_validator("public_url")
    @classmethod
    def _public_url_form(cls, value: str) -> str:
        if value and (problem := http_url_problem(value)):
            raise ValueError(f"the URL {problem} (e.g. https://my-machine.up.railway.app)")
        if value and "@" in value.split("://", 1)[-1].split("/", 1)[0]:
            # published in every status message and on the unauthenticated /status: no place for a password
            raise ValueError("the URL carries credentials (user@ or user:password@), which every status message "
                             "and /status would publish; give the bare URL and protect /health with health.token_env")
        return value


class StatusSection(_Model):
    interval: Duration = Field(10.0, gt=0)


class LogsSection(_Model):
    max_size: ByteSize = Field(10 * 2**20, gt=0, description="rotate a process log file at this size")
    backups: int = Field(5, le=100, description="rotated files kept per process log (at least 1)")

    @field_validator("backups")
    @classmethod
    def _keeps_a_backup(cls, value: int) -> int:
        if value < 1:  # with none, supervisord truncates the live file in place: the tailer cannot be lossless
            raise ValueError("keep at least 1 backup: with none, supervisord truncates a log in place when it reaches "
                             "logs.max_size, and output written since the telemetry tailer last read it is lost; use "
                             "1 or more (each backup takes up to logs.max_size of disk)")
        return value


class OutputsSection(_Model):
    """Job output files kept under <state_dir>/outputs (runtime/output_retention.py prunes them)."""

    retention: Duration = Field(86400.0, ge=0, description="job output folders older than this are deleted (0: kept)")
    max_size: ByteSize = Field(10 * 2**30, ge=0, description="the oldest job output folders are deleted while all "
                                                             "of them take more than this (0: no bound)")


class SupervisorSection(_Model):
    memory_check_interval: Duration = Field(2.0, gt=0)
    boot_timeout: Duration = Field(60.0, gt=0, description="longest wait for supervisord to come up")


class RestartSection(_Model):
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff_initial: Duration = 0.1
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max: Duration = 30.0
    reset_after: Duration = Field(30.0, description="uptime after which a crash counts as the first again")
    max_restarts: int = Field(10, ge=1)
    window: Duration = Field(60.0, gt=0)
    cooldown: Duration = Field(300.0, gt=0, description="an errored process is tried again after this")

    @model_validator(mode="after")
    def _backoff_order(self) -> "RestartSection":
        # (the cap would make every delay backoff_max); only when both are written: `backoff_max: 0` alone is
        # "no backoff", below the default backoff_initial
        if {"backoff_initial", "backoff_max"} <= self.model_fields_set and self.backoff_initial > self.backoff_max:
            raise ValueError(f"backoff_initial ({self.backoff_initial:g}s) is above backoff_max "
                             f"({self.backoff_max:g}s): the first delay cannot exceed the cap")
        return self


# A memory limit of 0 read as none (a falsy limit), and one under a process's interpreter alone restarts it at
# every check: at least 1 MiB, omitted for none.
def _memory_limit(value: int) -> int:
    if value < 2**20:
        raise ValueError("a memory limit under 1MiB restarts the process at every check (0 is no limit: omit "
                         "memory_limit for that)")
    return value


MemoryLimit = Annotated[ByteSize, AfterValidator(_memory_limit)]


class HealthCheck(_Model):
    http: str | None = Field(None, description="URL template answered with 2xx when healthy, e.g. "
                                               "http://127.0.0.1:{port}/system_stats")
    tcp: int | str | None = Field(None, description="port (or '{port}') that accepts a connection when healthy")
    interval: Duration = Field(5.0, gt=0)
    timeout: Duration = Field(2.0, gt=0)
    start_period: Duration = Field(60.0, ge=0, description="failures during this time after start don't count")
    retries: int = Field(3, ge=1, description="consecutive failures that make the service unhealthy")

    @model_validator(mode="after")
    def _one_kind(self) -> "HealthCheck":
        if (self.http is None) == (self.tcp is None):
            raise ValueError("give exactly one of 'http' (a URL) or 'tcp' (a port)")
        return self


class ServiceSection(_Model):
    command: str = Field(min_length=1, description="command template; placeholders {index} {port} {gpu}")
    cwd: str | None = None
    instances: Union[Literal["per_gpu"], Annotated[int, Field(ge=0, le=64)]] = 1
    port: int | None = Field(None, ge=1, le=65535, description="base port: instance i listens on port + i")
    env: dict[str, str] = Field(default_factory=dict)
    health: HealthCheck | None = None
    required: bool = Field(True, description="the machine is unhealthy while this service is")
    restart: RestartSection = Field(default_factory=RestartSection)
    memory_limit: MemoryLimit | None = Field(None, description="restart gracefully when the process tree's RSS "
                                                            "exceeds this")
    stop_signal: Literal[STOP_SIGNALS] = "TERM"  # type: ignore[valid-type]
    stop_grace: Duration = 30.0


class WorkerGroup(_Model):
    connector: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="connector name (entry point)")
    service: str | None = Field(None, description="bind to this service: start once it is healthy")
    count: Union[Literal["per_instance"], Annotated[int, Field(ge=0, le=256)]] | None = Field(
        None, description="integer, or per_instance (one per instance of `service`, the default when bound)")
    job_types: tuple[str, ...] = Field((), description="job types (service_required) served; default: connector")
    concurrency: int = Field(1, ge=1, le=64)
    settings: dict[str, Any] = Field(default_factory=dict, description="connector settings")
    capabilities: dict[str, Any] = Field(default_factory=dict, description="extra capability keys for matching")
    env: dict[str, str] = Field(default_factory=dict)
    restart: RestartSection = Field(default_factory=RestartSection)
    memory_limit: MemoryLimit | None = None
    stop_grace: Duration = Field(30.0, description="on SIGTERM a running job has this long to finish, less "
                                                   "a margin to hand it back; then SIGKILL")
    lease: Duration = Field(60.0, ge=1.0, description="claim lease: a dead worker's job is re-queued this long "
                                                      "after its last heartbeat (at most 10m); the heartbeat "
                                                      "renews it every third of it, at most every 20s")
    job_timeout: Duration = Field(3600.0, gt=0, description="a job running longer fails as retryable")
    job_timeouts: dict[str, Annotated[Duration, Field(gt=0)]] = Field(default_factory=dict, description="per job type")

    @field_validator("capabilities")
    @classmethod
    def _models_per_job_type(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """The claim looks a worker's models up per job type (`models: {job_type: [names]}`): a plain list
        (`models: [sdxl]`) or one name means those models for each of the group's job types. A model name
        given alone under a job type becomes a one-name list. Other shapes are reported by _cross_check."""
        models = value.get("models")
        if isinstance(models, dict):
            per_type = {k: [v] if isinstance(v, str) and v != "all" else v for k, v in models.items()}
            return {**value, "models": per_type} if per_type != models else value
        if isinstance(models, str) and models != "all":
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            return value
        types = info.data.get("job_types") or ((info.data["connector"],) if "connector" in info.data else ())
        if not types:  # the connector itself is missing or malformed: reported on its own
            return value
        return {**value, "models": {job_type: list(models) for job_type in types}}


class Manifest(BaseSettings):
    """A whole machine. Built by `load()`; `EMP_<SECTION>__<FIELD>` environment variables override YAML."""

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_prefix=ENV_PREFIX,
                                      env_nested_delimiter="__", case_sensitive=False)

    version: Literal[1] = 1
    machine: MachineSection = Field(default_factory=MachineSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    health: HealthSection = Field(default_factory=HealthSection)
    status: StatusSection = Field(default_factory=StatusSection)
    logs: LogsSection = Field(default_factory=LogsSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)
    supervisor: SupervisorSection = Field(default_factory=SupervisorSection)
    services: dict[str, ServiceSection] = Field(default_factory=dict)
    workers: dict[str, WorkerGroup] = Field(default_factory=dict)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    # Set by load(): where the manifest came from (for workers started from it and for messages).
    source: str = Field("", exclude=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # Environment first: an EMP_* variable beats the YAML value, as operators expect of an override.
        return (_MappingEnvSource(settings_cls, _ENVIRON.get(), _DATA.get()), init_settings)


_ENVIRON: ContextVar[Mapping[str, str]] = ContextVar("emp_manifest_environ", default={})
_DATA: ContextVar[Mapping[str, Any]] = ContextVar("emp_manifest_data", default={})  # the YAML, interpolated


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading a given mapping instead of os.environ (tests pass dicts).

    pydantic-settings (case_sensitive=False) lowercases every part of a variable's name; here the keys of
    free-form maps keep the case the variable gives (see _override_path)."""

    def __init__(self, settings_cls, environ: Mapping[str, str], data: Mapping[str, Any]):
        self._environ = environ
        self._data = data
        self._original = {key.lower(): key for key in environ}
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def explode_env_vars(self, field_name: str, field, env_vars: Mapping[str, str | None]) -> dict[str, Any]:
        # One variable at a time (pydantic-settings' own parsing of each), its keys put back in their case.
        result: dict[str, Any] = {}
        for name, value in env_vars.items():
            one = super().explode_env_vars(field_name, field, {name: value})
            if not one:
                continue
            original = self._original.get(name)
            if original is not None:
                _recase(one, _override_path(original, self._data)[1:])
            _deep_merge(result, one)
        return result


def _recase(nested: dict, path: tuple) -> None:
    """Rename the keys along the one path of `nested` (lowercased by pydantic-settings) to `path`'s."""
    node: Any = nested
    for key in path:
        if not isinstance(node, dict) or len(node) != 1:
            return
        (old, value), = node.items()
        if old != key:
            if not isinstance(old, str) or old != key.lower():
                return
            del node[old]
            node[key] = value
        node = value


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _override_path(name: str, data: Mapping[str, Any] | None) -> tuple:
    """The manifest path an `EMP_<SECTION>__<FIELD>...` variable sets. Field names are matched whatever their
    case; a key of a map of names (a service, a worker group, a connector setting) is the existing key that
    matches it whatever its case, else the name lowercased (names are lower-case: EMP_WORKERS__SIM__CONNECTOR
    adds `sim`, ...__SETTINGS__BASE_URL sets base_url); a key of a free-form map (env, capabilities,
    job_timeouts, telemetry.otlp_headers) is the key as the variable gives it."""
    annotation: Any = Manifest
    existing: Any = data
    path = []
    for part in name[len(ENV_PREFIX):].split("__"):
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[-1]
            key = part
            # Keys that are names: entries (models) and a connector's settings (its fields, lower-case)
            names_map = _model_of(annotation) is not None or path[:1] + path[2:] == ["workers", "settings"]
            if names_map and not (isinstance(existing, dict) and part in existing):
                names = existing if isinstance(existing, dict) else ()
                key = next((k for k in names if isinstance(k, str) and k.lower() == part.lower()), part.lower())
        else:
            key = part.lower()
            model = _model_of(annotation)
            annotation = model.model_fields[key].annotation if model and key in model.model_fields else None
        path.append(key)
        existing = existing.get(key) if isinstance(existing, dict) else None
    return tuple(path)


# -- loading ------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Manifest:
    """Read, interpolate, validate and resolve a manifest file. Raises ManifestError (never anything else)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(file, [ManifestProblem("", "file not found", hint="check the --manifest path")]) from None
    except UnicodeDecodeError as exc:
        raw = exc.object if isinstance(exc.object, bytes) else b""
        utf16 = raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise ManifestError(file, [ManifestProblem(
            "", "the file is UTF-16 text, not UTF-8" if utf16 else
                f"the file is not UTF-8 text (byte 0x{raw[exc.start]:02x} is not UTF-8)" if raw else
                "the file is not UTF-8 text",
            line=None if utf16 or not raw else raw[:exc.start].count(b"\n") + 1,
            hint=f"save it as UTF-8 (an editor's encoding setting, or e.g. iconv -f {'utf-16' if utf16 else 'latin1'} "
                 "-t utf-8)")]) from None
    except OSError as exc:
        raise ManifestError(file, [ManifestProblem("", f"cannot read the file: {exc}")]) from None
    return loads(text, file=file, environ=os.environ if environ is None else environ,
                 base_dir=Path(path).resolve().parent)


def loads(text: str, *, file: str = "<manifest>", environ: Mapping[str, str] | None = None,
          base_dir: Path | None = None) -> Manifest:
    environ = {} if environ is None else environ
    data, lines = _parse_yaml(text, file)
    problems: list[ManifestProblem] = []
    hidden: set[tuple] = set()  # paths whose value came from the environment: never repeated in a message
    data = _interpolate(data, environ, (), lines, problems, hidden)
    overrides = _env_overrides(environ, data)
    problems += _not_settable(data, lines, overrides)
    if problems:
        raise ManifestError(file, problems)
    hidden |= set(overrides)
    token, data_token = _ENVIRON.set(environ), _DATA.set(data)
    try:
        manifest = Manifest(**data)
    except ValidationError as exc:
        raise ManifestError(file, _problems_from_validation(exc, lines, overrides, hidden)) from None
    except ValueError as exc:  # pydantic-settings reports malformed EMP_* JSON values this way
        raise ManifestError(file, _bad_json_overrides(exc, environ, overrides)) from None
    finally:
        _ENVIRON.reset(token)
        _DATA.reset(data_token)
    problems = _cross_check(manifest, lines, hidden)
    if problems:
        raise ManifestError(file, problems)
    resolved = _resolve(manifest, environ, file, base_dir)
    problems = _check_resolved(resolved, manifest, environ, lines)
    if problems:
        raise ManifestError(file, problems)
    return resolved


# Fields the machine fills itself (Manifest.source, health.token): a manifest or EMP_* value is refused.
_NOT_SETTABLE = {("source",): "the machine records where the manifest came from itself",
                 ("health", "token"): "the token is read from the variable named by health.token_env "
                                      "(EMP_HEALTH_TOKEN by default); set that variable instead"}


def _not_settable(data: dict, lines: dict, overrides: dict) -> list[ManifestProblem]:
    problems = []
    for path, why in _NOT_SETTABLE.items():
        section = data if len(path) == 1 else data.get(path[0])
        if isinstance(section, dict) and path[-1] in section:
            problems.append(ManifestProblem(_dotted(path), "unknown key", line=_line(lines, path), hint=why))
        if path in overrides:
            problems.append(ManifestProblem(_dotted(path), f"environment variable {overrides[path]} cannot set "
                                                           f"this", hint=why))
    return problems


def _bad_json_overrides(exc: ValueError, environ: Mapping[str, str], overrides: dict) -> list[ManifestProblem]:
    """pydantic-settings parses an EMP_* variable that sets a section, a mapping or a list as JSON, and says
    only 'error parsing value for field "workers" from source "_MappingEnvSource"': name the variable (not its
    value: it may hold a secret), where JSON went wrong, and what valid JSON looks like."""
    field = match.group(1) if (match := re.search(r'field "([^"]+)"', str(exc))) else ""
    candidates = sorted((path, key) for path, key in overrides.items() if path[:1] == (field,))
    bad = [(path, key) for path, key in candidates if not _is_json(environ[key])]
    looks_json = [(path, key) for path, key in bad if environ[key].lstrip()[:1] in ("{", "[")]
    culprits = looks_json or bad or candidates
    cause = exc.__cause__
    where = f" ({cause})" if isinstance(cause, json.JSONDecodeError) else ""  # a position, not the text
    problems = []
    for path, key in culprits:
        example = _JSON_EXAMPLES.get(path, '{"key": "value"}')
        problems.append(ManifestProblem(
            _dotted(path), f"environment variable {key} is not valid JSON{where}; {_dotted(path)} takes a "
                           f"mapping or list here, written as JSON",
            hint=f"e.g. {key}='{example}', or set one field at a time: {key}__<FIELD>=value"))
    return problems or [ManifestProblem(field, f"an environment override of {field or 'a field'} is not valid JSON",
                                        hint="EMP_* variables that set a section take JSON, e.g. "
                                             "EMP_STATUS='{\"interval\": \"10s\"}'")]


_JSON_EXAMPLES = {("workers",): '{"sim": {"connector": "simulation"}}',
                  ("status",): '{"interval": "10s"}',
                  ("telemetry", "otlp_headers"): '{"x-api-key": "..."}'}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


MAX_ALIAS_VALUES = 10_000  # values that YAML aliases may repeat in all: a manifest needs a handful
MAX_DEPTH = 64  # nesting levels: a manifest needs about six


class _Refused(yaml.composer.ComposerError):
    """YAML that parses but that we do not take (alias bombs, loops, deep nesting, huge numbers)."""

    def __init__(self, problem: str, mark, hint: str, path: tuple = ()):
        super().__init__(None, None, problem, mark)
        self.hint, self.path = hint, path


class _Loader(yaml.SafeLoader):
    """The safe loader, bounded: aliases may repeat at most MAX_ALIAS_VALUES values in all (a few hundred
    bytes of nested aliases otherwise expand to billions), may not refer to a value that contains them (a
    loop), nesting stops at MAX_DEPTH, and an integer too long to convert is reported at its line."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._open: set[str] = set()  # anchors whose value is still being composed
        self._repeated = 0
        self._sizes: dict[int, int] = {}
        self._path: list = []  # where the node being composed sits (None for a key)

    def compose_node(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        part = index.value if isinstance(index, yaml.ScalarNode) else index if isinstance(index, int) else None
        where = tuple(p for p in (*self._path, part) if p is not None)
        if isinstance(event, yaml.AliasEvent):
            if anchor in self._open:
                raise _Refused(f"the alias *{anchor} is used inside the value it names (a loop)", event.start_mark,
                               f"refer to *{anchor} only after the value of &{anchor} ends", where)
            if anchor in self.anchors:
                self._repeated += self._size(self.anchors[anchor])
                if self._repeated > MAX_ALIAS_VALUES:
                    raise _Refused(f"YAML aliases repeat more than {MAX_ALIAS_VALUES} values (an alias bomb?)",
                                   event.start_mark, "write the values out, or use fewer aliases", where)
            return super().compose_node(parent, index)
        if len(self._path) >= MAX_DEPTH:
            raise _Refused(f"values are nested more than {MAX_DEPTH} levels deep", event.start_mark,
                           "a manifest needs only a few levels; check the brackets", where)
        self._path.append(part)
        if anchor is not None:
            self._open.add(anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()
            self._open.discard(anchor)

    def _size(self, node: yaml.Node) -> int:
        """Values under `node` counted as repeated by an alias (shared sub-values counted each time)."""
        if id(node) not in self._sizes:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(k) + self._size(v) for k, v in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(item) for item in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return self._sizes[id(node)]

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
            raise _Refused("this number is too long to read", node.start_mark,
                           "quote it if it is text; no setting takes a number that long") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _parse_yaml(text: str, file: str) -> tuple[dict, dict[tuple, int]]:
    loader = None
    try:
        loader = _Loader(text)  # reads the text at once: a character YAML forbids (NUL) is reported here
        node = loader.get_single_node()
        written = _written_keys(node)  # before construction: a merge key (<<) then adds the merged keys
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, _Refused):
            raise ManifestError(file, [ManifestProblem(_dotted(exc.path), problem, line=line, hint=exc.hint)]) from None
        raise ManifestError(file, [ManifestProblem("", f"not valid YAML: {problem}", line=line,
                                                   hint="check indentation, colons and quotes")]) from None
    except (RecursionError, ValueError, OverflowError) as exc:  # a safety net: the loader bounds what it takes
        raise ManifestError(file, [ManifestProblem("", f"cannot read the YAML: {type(exc).__name__}",
                                                   hint="simplify the nesting, aliases and long numbers")]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise ManifestError(file, [ManifestProblem("", "the manifest is empty",
                                                   hint="start from machines/simulation.yaml")])
    if not isinstance(data, dict):
        raise ManifestError(file, [ManifestProblem("", f"expected a mapping of sections at the top, got "
                                                       f"{type(data).__name__}", line=1)])
    lines: dict[tuple, int] = {}
    problems: list[ManifestProblem] = []
    _index_lines(node, (), lines, problems, written)
    if problems:
        raise ManifestError(file, problems)
    return data, lines


def _written_keys(node: yaml.Node | None) -> dict[int, set[int]]:
    """Each mapping node's id -> the ids of the key nodes written in it (before construction adds a merge's),
    each node visited once (an alias reuses its node)."""
    written: dict[int, set[int]] = {}
    seen: set[int] = set()
    stack = [node] if node is not None else []
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.MappingNode):
            written[id(current)] = {id(key_node) for key_node, _ in current.value}
            stack.extend(value_node for _, value_node in current.value)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(current.value)
    return written


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], problems: list[ManifestProblem],
                 written: dict[int, set[int]]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        own = written.get(id(node), set())
        for key_node, value_node in node.value:
            key = key_node.value
            if id(key_node) in own:  # (a key a merge (<<) brought in may be written again: it overrides)
                if key in seen:
                    problems.append(ManifestProblem(_dotted(path + (key,)), "this key appears twice",
                                                    line=key_node.start_mark.line + 1, hint="keep one of them"))
                seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, problems, written)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (i,), lines, problems, written)


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{([^}]*)\}|(\$\{)")


def _is_template(path: tuple) -> bool:
    """Whether the string at `path` is a template whose {placeholders} are filled later (str.format)."""
    if len(path) < 3 or path[0] not in ("services", "workers"):
        return False
    rest = path[2:]
    if path[0] == "services":
        return rest in (("command",), ("cwd",), ("health", "http"), ("health", "tcp")) or (
            len(rest) == 2 and rest[0] == "env")
    return (len(rest) == 2 and rest[0] == "env") or (len(rest) >= 2 and rest[0] == "settings")


def _interpolate(value: Any, environ: Mapping[str, str], path: tuple, lines: dict, problems: list,
                 hidden: set | None = None) -> Any:
    """`${VAR}` (required), `${VAR:-default}` (unset or empty), `$$` for a literal dollar.

    The paths that took a variable's value are added to `hidden`: error messages never repeat such a value.
    In a template (a command, an env value...) the value's braces are doubled: it is text, not placeholders."""
    hidden = set() if hidden is None else hidden
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                problems.append(ManifestProblem(_dotted(path + (str(key),)), f"keys must be names, got {key!r}",
                                                line=_line(lines, path + (key,)), hint="quote it or rename it"))
        return {k: _interpolate(v, environ, path + (k,), lines, problems, hidden) for k, v in value.items()
                if isinstance(k, str)}
    if isinstance(value, list):
        return [_interpolate(v, environ, path + (i,), lines, problems, hidden) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    template = _is_template(path)

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(3) is not None:
            problems.append(ManifestProblem(_dotted(path), f"malformed variable reference {match.group(0)!r}",
                                            line=_line(lines, path), hint="write ${NAME} or ${NAME:-default}"))
            return ""
        if match.group(4) is not None:  # kept as text, it became the value (a machine id '${MACHINE_NAME')
            problems.append(ManifestProblem(_dotted(path), "a variable reference '${' is not closed by '}'",
                                            line=_line(lines, path),
                                            hint="write ${NAME} or ${NAME:-default}; $$ for a literal $"))
            return ""
        name, default = match.group(1), match.group(2)
        if default is not None and "${" in default:  # ${A:-${B:-x}}: the inner one ended at its own brace
            problems.append(ManifestProblem(_dotted(path), f"a default holding another reference "
                                                           f"(${{{name}:-${{...}}}}) is not supported",
                                            line=_line(lines, path),
                                            hint=f"give {name} a plain default, or set it in the environment"))
            return ""
        current = environ.get(name)
        if current is None or (current == "" and default is not None):
            if default is not None:
                return default
            problems.append(ManifestProblem(_dotted(path), f"environment variable {name} is not set",
                                            line=_line(lines, path),
                                            hint=f"export {name}, or write ${{{name}:-default}}"))
            return ""
        hidden.add(path)
        return current.replace("{", "{{").replace("}", "}}") if template else current

    return _VAR.sub(replace, value)


def _env_overrides(environ: Mapping[str, str], data: Mapping[str, Any] | None = None) -> dict[tuple, str]:
    """EMP_HEALTH__PORT -> ('health', 'port'): which paths the environment overrides, for error messages
    (keys cased as the override sets them: see _override_path)."""
    fields = set(Manifest.model_fields)
    found = {}
    for key in environ:
        if key.upper().startswith(ENV_PREFIX):
            parts = _override_path(key, data)
            if parts and parts[0] in fields:
                found[parts] = key
    return found


# -- errors -------------------------------------------------------------------------------------------------

def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, str) and not part.isprintable():  # a name with a line break stays on one line
            part = repr(part)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line(lines: dict[tuple, int], path: tuple) -> int | None:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]] if cut else None
    return None


def _problems_from_validation(exc: ValidationError, lines: dict, overrides: dict,
                              hidden: set | frozenset = frozenset()) -> list[ManifestProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        if loc and loc[-1] == "source":
            continue
        message, hint = _message(err, loc, hidden)
        env_key = next((overrides[p] for p in overrides if loc[: len(p)] == p), None)
        if env_key:
            hint = f"set by environment variable {env_key}" + (f"; {hint}" if hint else "")
        problems.append(ManifestProblem(_dotted(loc), message, line=_line(lines, loc), hint=hint))
    return problems


_UNION_TAG = re.compile(r"^(function-(after|before|wrap|plain)|literal|lax-or-strict|json-or-python|union|"
                        r"nullable|chain|tagged-union|model|constrained-[a-z]+)(\[.*\])?$")
_BARE_TAGS = {"int", "str", "float", "bool", "none", "dict", "list", "tuple"}


def _clean_loc(loc: tuple) -> tuple:
    """pydantic adds union-branch tags ('int', 'literal['per_gpu']', 'function-after[...]') to locations.

    Known imprecision: a user's dict key spelt exactly like a bare tag (a service named `int`) is dropped
    from the path too; the message and line stay right.
    """
    out: list = []
    for part in loc:
        if isinstance(part, str) and out and (_UNION_TAG.match(part) or part in _BARE_TAGS):
            continue
        out.append(part)
    return tuple(out)


def _message(err: dict, loc: tuple, hidden: set | frozenset = frozenset()) -> tuple[str, str | None]:
    """The message for one pydantic error, and a hint. The value is repeated only where it is safe: not one
    that came from the environment (`hidden`: ${VAR}, EMP_*), nor a field named like a credential, nor one of
    a model with hide_input_in_errors (telemetry, redis: URLs and headers carry credentials)."""
    kind = err["type"]
    if kind == "extra_forbidden" and loc:
        valid = _valid_keys(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else (f"valid keys: {', '.join(valid)}" if valid else None)
        return "unknown key", hint
    if kind == "missing":
        return "required field is missing", None
    if kind in ("model_type", "dict_type"):  # pydantic names its class: "... or instance of RedisSection"
        valid = _valid_keys(loc) if loc else []
        got = err.get("input")
        what = "nothing" if got is None else _yaml_kind(got)
        return (f"expected a mapping (its keys indented under it), got {what}",
                f"valid keys: {', '.join(valid)}" if valid else "write `key: value` lines under it")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    got = err.get("input")
    text = getattr((err.get("ctx") or {}).get("error"), "text", None)
    if text is not None:  # units.UnitError: the same message without the value, added below if safe
        message = text
    secret = _is_hidden(loc, hidden)
    if secret and isinstance(got, str) and got:
        message = message.replace(repr(got), "<the value>")
        if len(got) >= 6:  # a shorter one could match a number of the message's own text
            message = message.replace(got, "<the value>")
    if (kind not in ("model_type", "dict_type") and not isinstance(got, (dict, list)) and got is not None
            and "got " not in message):
        from_env = any(loc[:cut] in hidden for cut in range(1, len(loc) + 1))
        shown = _hidden_repr(got, from_env) if secret and (from_env or isinstance(got, str)) else _safe_repr(loc, got)
        message += f" (got {shown})"
    hint = None
    pattern = str((err.get("ctx") or {}).get("pattern", ""))
    if kind == "string_pattern_mismatch" and pattern.startswith(("^[a-z]", "[a-z]")):  # a name: say the rule
        message = message.replace(f"String should match pattern '{pattern}'", "not a valid name")
        hint = "names are lower-case letters, digits, '-' and '_', starting with a letter"
        if isinstance(got, str) and not secret and re.fullmatch(pattern.strip("^$"), got.lower()):
            hint = f"did you mean '{got.lower()}'? {hint}"
    return message, hint


def _yaml_kind(value: Any) -> str:
    """What a value is, in YAML's words (not Python's class names)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


_SECRET_KEY = re.compile(r"(pass|secret|token|key|auth|credential)", re.IGNORECASE)


def _safe_repr(loc: tuple, value: Any) -> str:
    if any(isinstance(p, str) and _SECRET_KEY.search(p) for p in loc):
        return "<redacted>"
    shown = repr(identity.redact_url(value)) if isinstance(value, str) else repr(value)
    return shown if len(shown) <= 60 else shown[:50] + "..."


def _is_hidden(loc: tuple, hidden: set | frozenset) -> bool:
    """Whether the value at `loc` must not be repeated: it came from the environment, or its model hides
    its inputs in errors."""
    if any(loc[:cut] in hidden for cut in range(1, len(loc) + 1)):
        return True
    annotation: Any = Manifest
    for part in loc:
        model = _model_of(annotation)
        if model is not None and model.model_config.get("hide_input_in_errors"):
            return True
        annotation = _step(annotation, part)
        if annotation is None:
            return False
    model = _model_of(annotation)
    return bool(model is not None and model.model_config.get("hide_input_in_errors"))


def _hidden_repr(value: Any, from_env: bool) -> str:
    """What a message says of a value it must not show: its type and length."""
    why = "it comes from the environment" if from_env else "it may hold a credential"
    if isinstance(value, str):
        return f"text of {len(value)} characters, not shown: {why}"
    return f"a {type(value).__name__}, not shown: {why}"


def _valid_keys(loc: tuple) -> list[str]:
    """The field names accepted at `loc`, found by walking the model annotations."""
    annotation: Any = Manifest
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _model_of(annotation)
    return [name for name in model.model_fields if name != "source"] if model else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        model = _model_of(arg)
        if model:
            return model
    return None


def _step(annotation: Any, part: Any) -> Any:
    """The annotation one level below `annotation` at key or index `part`."""
    model = _model_of(annotation)
    if typing.get_origin(annotation) is dict or (model is None and typing.get_args(annotation)):
        args = typing.get_args(annotation)
        return args[-1] if args else None
    if model is not None and isinstance(part, str) and part in model.model_fields:
        return model.model_fields[part].annotation
    return None


def _cross_check(manifest: Manifest, lines: dict, hidden: set | frozenset = frozenset()) -> list[ManifestProblem]:
    """Rules across fields: names, bindings, placeholders, ports, values carried by supervisord's config."""
    problems: list[ManifestProblem] = []

    def add(path: tuple, message: str, hint: str | None = None) -> None:
        problems.append(ManifestProblem(_dotted(path), message, line=_line(lines, path), hint=hint))

    for group, names in (("services", manifest.services), ("workers", manifest.workers)):
        for name in names:
            if not re.fullmatch(NAME_PATTERN, name):
                add((group, name), "names are lower-case letters, digits, '-' and '_', starting with a letter "
                                   "(at most 40)")
            elif name in RESERVED_NAMES:
                add((group, name), f"'{name}' is reserved for the machine's own processes", "pick another name")

    for name, svc in manifest.services.items():
        placeholders = set(SERVICE_PLACEHOLDERS)
        if svc.port is None:
            placeholders.discard("port")
        if svc.instances != "per_gpu":
            placeholders.discard("gpu")
        texts: list[tuple[tuple, str]] = [(("services", name, "command"), svc.command)]
        if svc.cwd:
            texts.append((("services", name, "cwd"), svc.cwd))
        texts += [(("services", name, "env", k), v) for k, v in svc.env.items()]
        if svc.health and svc.health.http:
            texts.append((("services", name, "health", "http"), svc.health.http))
        if svc.health and isinstance(svc.health.tcp, str):
            texts.append((("services", name, "health", "tcp"), svc.health.tcp))
            if svc.health.tcp != "{port}" and not svc.health.tcp.isdigit():
                add(("services", name, "health", "tcp"), "expected a port number or '{port}'")
        tcp = svc.health.tcp if svc.health else None
        if (isinstance(tcp, int) or (isinstance(tcp, str) and tcp.isdigit())) and not 1 <= int(tcp) <= 65535:
            # (a probe of it failed without a word, for ever: the machine stayed `starting`)
            add(("services", name, "health", "tcp"), f"port {tcp} is not a TCP port",
                "a port from 1 to 65535, or '{port}' (the instance's own)")
        for path, text in texts:
            _check_placeholders(text, placeholders, path, add, svc)
        _check_command(name, svc, add)
        if svc.cwd and (problem := config_value_problem(svc.cwd)) is not None:
            add(("services", name, "cwd"), f"the directory {problem}", _config_fix(problem))
        if svc.health and svc.health.http:
            _check_health_url(svc.health.http, name, svc, add)
        _check_env(("services", name, "env"), svc.env, add)

    _check_ports(manifest, add)

    services = list(manifest.services)
    for name, group in manifest.workers.items():
        for i, job_type in enumerate(group.job_types):
            if not job_type.strip():
                add(("workers", name, "job_types", i), "a job type cannot be blank",
                    "list names such as comfyui, or leave job_types out to serve the connector's own")
            elif job_type != job_type.strip() or not job_type.isprintable():
                add(("workers", name, "job_types", i), "a job type cannot begin or end with whitespace or hold "
                                                       "control characters", "write the bare name")
        if group.service is not None and group.service not in manifest.services:
            close = difflib.get_close_matches(group.service, services, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"declared services: {', '.join(services)}" if services else "declare it under services:")
            add(("workers", name, "service"), "no service has the name an environment variable gave (not shown)"
                if ("workers", name, "service") in hidden else f"no service named '{group.service}'", hint)
        if group.count == "per_instance" and group.service is None:
            add(("workers", name, "count"), "per_instance needs a bound service", "set workers.<name>.service")
        _check_connector(name, group, manifest, lines, add, hidden)
        if group.lease > MAX_LEASE_S:
            add(("workers", name, "lease"), f"a lease of {group.lease:g}s would leave the job of a worker that "
                                            f"died stuck that long before another worker may run it",
                f"use at most {MAX_LEASE_S:g}s (10m); jobs longer than the lease are fine, the heartbeat renews it")
        for key in ("hardware", "performance"):
            if key in group.capabilities and not isinstance(group.capabilities[key], dict | None):
                add(("workers", name, "capabilities", key), f"expected a mapping, got "
                                                             f"{type(group.capabilities[key]).__name__}",
                    "e.g. hardware: {gpu_memory_gb: 24}; its keys override the probed ones")
        for key in sorted(RESERVED_CAPABILITIES.keys() & group.capabilities.keys()):
            add(("workers", name, "capabilities", key), *RESERVED_CAPABILITIES[key])
        _check_models(("workers", name, "capabilities", "models"), group.capabilities.get("models"), add)
        placeholders = set(WORKER_PLACEHOLDERS)
        if group.service is None:
            placeholders -= {"service_port", "service_index"}
        for key, value in group.env.items():
            _check_placeholders(value, placeholders, ("workers", name, "env", key), add, None)
        _check_env(("workers", name, "env"), group.env, add)
    return problems


CONNECTOR_GROUP = "emp_machine.connectors"


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _fill_known(values: Mapping[str, Any], halve: bool):
    """For _PLACEHOLDER.sub: a known name's value, a doubled brace as one when `halve` (as str.format), else
    the text as it is."""
    def fill(m: re.Match) -> str:
        name = m.group(1)
        if name is None:
            return m.group(0)[0] if halve else m.group(0)
        return str(values[name]) if name in values else m.group(0)
    return fill


def expand_settings(value: Any, values: Mapping[str, Any]) -> Any:
    """Fill placeholders (`{service_port}`, `{worker_id}`, ...) in connector settings strings (str.format,
    which also turns the `{{`/`}}` that interpolation made of a variable's braces back into one). A string
    that does not format as a whole (a rest URL's own `{job_id}` beside `{service_port}`, a JSON text) gets
    only the known names filled, the rest left as it is: str.format alone gave up on the whole string, so
    `{service_port}` beside `{job_id}` was never filled."""
    if isinstance(value, str):
        if "{" not in value:
            return value
        try:
            return value.format(**values)
        except (KeyError, IndexError, ValueError, AttributeError):
            # Only format-style text (every brace doubled or a {name}) has its doubled braces halved, as
            # str.format would; other brace text (a JSON literal) keeps every brace.
            halve = not any(c in _PLACEHOLDER.sub("", value) for c in "{}")
            return _PLACEHOLDER.sub(_fill_known(values, halve), value)
    if isinstance(value, dict):
        return {k: expand_settings(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_settings(v, values) for v in value]
    return value


@functools.lru_cache(maxsize=4)
def _connector_entry_points(search_path: tuple[str, ...]) -> tuple:
    """Installed connector entry points, cached per import path (scanning distributions takes milliseconds,
    and a package added to the path later must still be found)."""
    from importlib.metadata import entry_points

    return tuple(entry_points(group=CONNECTOR_GROUP))


def _check_connector(name: str, group: WorkerGroup, manifest: Manifest, lines: dict, add,
                     hidden: set | frozenset = frozenset()) -> None:
    """The connector is installed, imports, and accepts these settings (validated as the worker will)."""
    from emp_machine.connectors.base import validate_settings
    from emp_machine.connectors.registry import ConnectorRegistry
    from emp_machine.errors import ConnectorLoadError

    path = ("workers", name, "connector")
    found = _connector_entry_points(tuple(sys.path))
    installed = sorted({ep.name for ep in found})
    if group.connector not in installed:
        close = difflib.get_close_matches(group.connector, installed, n=1, cutoff=0.5)
        hint = (f"did you mean '{close[0]}'? " if close else "") + f"installed: {', '.join(installed) or 'none'}"
        add(path, "no connector has the name an environment variable gave (not shown)" if path in hidden
            else f"no connector named '{group.connector}'", hint)
        return
    registry = ConnectorRegistry.discover([ep for ep in found if ep.name == group.connector])
    try:
        cls = registry.get(group.connector)
    except ConnectorLoadError as exc:
        add(path, str(exc), "fix or reinstall the package that provides it")
        return
    service = manifest.services.get(group.service) if group.service else None
    sample = {"index": 0, "machine_id": "m", "worker_id": "m-worker-0", "name": "worker-0",
              "service_port": service.port if service and service.port else 1, "service_index": 0}
    try:
        validate_settings(cls.Settings, expand_settings(group.settings, sample))
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = ("workers", name, "settings", *_clean_loc(err["loc"]))
            message, hint = _message(err, loc, hidden)
            if err["type"] == "extra_forbidden":
                valid = sorted(cls.Settings.model_fields)
                close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"{group.connector} settings: {', '.join(valid)}"
            add(loc, message, hint)


def _check_health_url(template: str, name: str, svc: ServiceSection, add) -> None:
    """The health URL as the first instance would get it: http(s), a host, a port that is a number."""
    try:
        url = template.format(index=0, port=svc.port or 1, gpu=0, machine_id="m", name=name)
    except (KeyError, IndexError, ValueError):
        return  # a placeholder problem, reported by _check_placeholders
    if (problem := http_url_problem(url)) is not None:
        add(("services", name, "health", "http"), f"the health URL {problem}", "e.g. http://127.0.0.1:{port}/health")


def _check_placeholders(text: str, allowed: set[str], path: tuple, add, svc: ServiceSection | None) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        add(path, f"malformed placeholder: {exc}", "write {name}; a literal brace is {{ or }}")
        return
    for field_name in fields:
        if field_name in allowed:
            continue
        if field_name == "port" and svc is not None and svc.port is None:
            add(path, "{port} is used but the service has no port", "set a base port: port: 8188")
        elif field_name == "gpu" and svc is not None:
            add(path, "{gpu} is only known with instances: per_gpu", "use {index}, or instances: per_gpu")
        else:
            close = difflib.get_close_matches(field_name, sorted(allowed), n=1, cutoff=0.5)
            hint = f"did you mean '{{{close[0]}}}'?" if close else f"known: {', '.join(sorted(allowed))}"
            add(path, f"unknown placeholder {{{field_name}}}", hint)


def _check_models(path: tuple, models: Any, add) -> None:
    """capabilities.models as the claim reads it: 'all', or per job type 'all' or a list of names (a plain
    list was spread over the group's job types when the manifest was validated)."""
    names_hint = ("e.g. models: [sdxl, flux], meaning those for each of the group's job types, or "
                  "models: {comfyui: [sdxl]}")
    if models is None or models == "all":
        return
    entries = models.items() if isinstance(models, dict) else [(None, models)]
    for job_type, names in entries:
        where = path if job_type is None else path + (job_type,)
        if names is None or names == "all":
            continue
        if not isinstance(names, list):
            add(where, f"expected a list of model names (or 'all'), got {type(names).__name__}", names_hint)
        elif odd := [n for n in names if not isinstance(n, str)]:
            add(where, f"model names are text, got {odd[0]!r}", "quote the name, e.g. '1.5'")


def _check_env(path: tuple, env: dict[str, str], add) -> None:
    for key, value in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            add(path + (key,), "environment variable names are letters, digits and '_', not starting with a digit")
        elif (problem := env_value_problem(value)) is not None:
            add(path + (key,), f"the value {problem}" + ("" if "supervisord" in problem else
                                                         ", which supervisord cannot pass on"), _config_fix(problem))


def _config_fix(problem: str) -> str | None:
    """The fix for a value supervisord's config cannot hold (see config_value_problem, env_value_problem)."""
    if "comment" in problem:
        return COMMENT_FIX
    if "control character" in problem or "line break" in problem:
        return "keep it on one line, without control characters"
    if "whitespace" in problem:
        return "remove the whitespace at the ends"
    return None


def _check_command(name: str, svc: ServiceSection, add) -> None:
    """The command splits into words as the machine will split it, and its line survives supervisord.conf."""
    path = ("services", name, "command")
    try:
        command = svc.command.format(index=0, port=svc.port or 1, gpu=0, machine_id="m", name=f"{name}-0")
    except (KeyError, IndexError, ValueError, AttributeError):
        return  # a placeholder problem, reported by _check_placeholders
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        if "quotation" in str(exc):
            add(path, "unbalanced quote: a ' or \" has no closing one",
                "close the quote; inside a word write \\' or \\\", or quote it with the other kind")
        else:
            add(path, "the command ends with a lone backslash", "remove it, or write \\\\ for a backslash")
        return
    if not argv:
        add(path, "the command is blank", "give the program and its arguments, e.g. python main.py --port {port}")
    elif (problem := config_value_problem(shlex.join(argv))) is not None:
        add(path, f"the command {problem}", _config_fix(problem))


def _check_ports(manifest: Manifest, add) -> None:
    """Instance i of a service listens on port + i: the ranges stay under 65536 and apart, and off health.port."""
    gpus = manifest.machine.gpus if isinstance(manifest.machine.gpus, int) else None
    ranges: list[tuple[int, int, str]] = []
    for name, svc in manifest.services.items():
        count = svc.instances if isinstance(svc.instances, int) else gpus  # per_gpu on 'auto': checked at boot
        if svc.port is None or not count:
            continue
        last = svc.port + count - 1
        if last > 65535:
            add(("services", name, "port"), f"{count} instance(s) from port {svc.port} need ports up to {last}, "
                                            f"past 65535", "lower the port or the number of instances")
        ranges.append((svc.port, min(last, 65535), name))
    ranges.sort()
    for i, (low, high, name) in enumerate(ranges):
        for other_low, other_high, other in ranges[i + 1:]:
            if other_low <= high:
                add(("services", other, "port"), f"its ports {other_low}-{other_high} overlap ports {low}-{high} "
                                                 f"of services.{name}",
                    "give each service its own range: instance i listens on port + i")
    health = manifest.health.port
    for low, high, name in ranges:
        if health and low <= health <= high:
            add(("health", "port"), f"port {health} is also a port of services.{name} ({low}-{high})",
                "pick another port for the health server")


def _check_resolved(resolved: Manifest, manifest: Manifest, environ: Mapping[str, str],
                    lines: dict) -> list[ManifestProblem]:
    """The machine id, state directory and Redis URL as resolved (from the manifest or the environment) go
    into supervisord.conf and into every process's environment: they must survive both."""
    problems: list[ManifestProblem] = []
    machine_id, state_dir = resolved.machine.id, resolved.machine.state_dir
    id_from = ("" if manifest.machine.id else
               "set by the environment variable MACHINE_ID; " if environ.get("MACHINE_ID") else None)
    if id_from is not None:
        path = ("machine", "id")
        problem = config_value_problem(machine_id) or env_value_problem(machine_id)
        if problem is not None:
            problems.append(ManifestProblem("machine.id", f"the machine id {problem}", line=_line(lines, path),
                                            hint=id_from + "use letters, digits and '-', e.g. comfyui-1"))
        elif not re.search(r"[a-z0-9]", machine_id.lower()):
            problems.append(ManifestProblem(
                "machine.id", "the machine id has no letters or digits: its state directory would be the one "
                              "every such machine shares", line=_line(lines, path),
                hint=id_from + "use letters, digits and '-', e.g. comfyui-1"))
    problem = config_value_problem(state_dir)
    fix = "choose a path without ' ;', ' #', line breaks or spaces at the ends"
    if problem is None and "%" in state_dir:
        # supervisord expands its programs' log file paths twice, so no escape of ours survives: the boot failed
        # on its format error (or, with '%(here)s', the logs went elsewhere)
        problem = "holds '%', which supervisord expands in the log file paths it writes there"
        fix = "choose a path without '%'"
    if problem is not None:
        where = "" if manifest.machine.state_dir else "it comes from XDG_STATE_HOME (or HOME): "
        problems.append(ManifestProblem("machine.state_dir", f"the state directory {problem}",
                                        line=_line(lines, ("machine", "state_dir")),
                                        hint=f"{where}{fix} (set machine.state_dir)"))
    if resolved.redis.url != "embedded" and (problem := env_value_problem(resolved.redis.url)) is not None:
        problems.append(ManifestProblem("redis.url", f"the Redis URL {problem}, which supervisord cannot pass to "
                                                     "the workers", line=_line(lines, ("redis", "url")),
                                        hint="percent-encode the character in the URL (e.g. %20 for a space)"))
    return problems


def socket_problem(manifest: Manifest, source: str) -> ManifestError | None:
    """A resolved state directory too long for supervisord's socket in it: the machine refuses to boot there,
    so `validate` says so (other commands need no socket: a preview on a box with a long XDG_STATE_HOME)."""
    socket_path = Paths(Path(manifest.machine.state_dir).absolute()).socket
    if len(str(socket_path)) <= MAX_UNIX_SOCKET_PATH:
        return None
    return ManifestError(source, [ManifestProblem(
        "machine.state_dir", f"the state directory is too long for supervisord's socket in it ({socket_path}: "
                             f"{len(str(socket_path))} characters, over the unix limit of {MAX_UNIX_SOCKET_PATH})",
        hint="set machine.state_dir (or EMP_MACHINE__STATE_DIR; by default it is under XDG_STATE_HOME or HOME) "
             "to a shorter directory")])


# -- resolution ---------------------------------------------------------------------------------------------

def _resolve(manifest: Manifest, environ: Mapping[str, str], file: str, base_dir: Path | None) -> Manifest:
    """Fill what the environment decides: machine id, Redis URL override, state directory, source path."""
    machine = manifest.machine
    machine_id = identity.machine_id(machine.id, machine.type, environ, socket.gethostname())
    region = machine.region or environ.get("RAILWAY_REPLICA_REGION", "")
    state_dir = machine.state_dir or identity.default_state_dir(machine_id, environ)
    redis_url = environ.get("REDIS_URL") or environ.get("HUB_REDIS_URL") or manifest.redis.url
    try:
        redis = RedisSection(url=redis_url)
    except ValidationError:
        name = "REDIS_URL" if environ.get("REDIS_URL") else "HUB_REDIS_URL"
        raise ManifestError(file, [ManifestProblem("redis.url", f"environment variable {name} is not a Redis "
                                                                "URL", hint="expected redis://host:port/db")]) from None
    if base_dir is not None and not Path(state_dir).is_absolute():
        state_dir = str(base_dir / state_dir)
    health = manifest.health
    public_url = health.public_url
    if not public_url and environ.get("RAILWAY_PUBLIC_DOMAIN"):
        public_url = f"https://{environ['RAILWAY_PUBLIC_DOMAIN'].strip().rstrip('/')}"
    token = environ.get(health.token_env, "").strip()
    telemetry = telemetry_with_env(manifest.telemetry, environ, file)
    return manifest.model_copy(update={
        "machine": machine.model_copy(update={"id": machine_id, "region": region, "state_dir": state_dir}),
        "redis": redis,
        "health": health.model_copy(update={"public_url": public_url,
                                            "token": SecretStr(token) if token else None}),
        "telemetry": telemetry,
        "source": str(Path(file).resolve()) if file != "<manifest>" else "",
    })


# -- finding manifests and running machines (operator commands) ---------------------------------------------

BUILTIN_DEFAULT = Path(__file__).resolve().parent.parent / "machines" / "simulation.yaml"


def default_manifest(environ: Mapping[str, str] | None = None) -> Path:
    """`EMP_MANIFEST`, else the simulation manifest shipped in the package (the embedded default)."""
    environ = os.environ if environ is None else environ
    return Path(environ["EMP_MANIFEST"]) if environ.get("EMP_MANIFEST") else BUILTIN_DEFAULT


def running_machine(state_dir: Path) -> dict | None:
    """The pointer document (`run/machine.json`) of the machine using `state_dir`, if its process is alive."""
    try:
        doc = json.loads((Path(state_dir) / "run" / "machine.json").read_text(encoding="utf-8"))
        os.kill(int(doc["pid"]), 0)
        return doc
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running_machines(environ: Mapping[str, str] | None = None) -> list[dict]:
    """Pointer documents of this user's live machines: those under the per-user state root, and those the
    per-user registry names (a machine whose manifest sets machine.state_dir elsewhere: machine.py
    registry_entry). An entry whose machine is gone (its pid dead, no run/machine.json) is ignored."""
    from emp_machine.runtime.machine import REGISTRY_DIR

    environ = os.environ if environ is None else environ
    root = identity.state_root(environ)
    state_dirs = {pointer.parent.parent for pointer in sorted(root.glob("*/run/machine.json"))}
    for entry in sorted((root / REGISTRY_DIR).glob("*.json")):
        try:
            doc = json.loads(entry.read_text(encoding="utf-8"))
            os.kill(int(doc["pid"]), 0)
            state_dirs.add(Path(doc["state_dir"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    found = (running_machine(state_dir) for state_dir in sorted(state_dirs))
    docs = {}
    for doc in found:
        if doc is not None:
            docs.setdefault(doc.get("socket"), doc)  # a state dir reached both ways: once
    return list(docs.values())


def telemetry_with_env(telemetry: TelemetryConfig, environ: Mapping[str, str], file: str, *, where: str = "",
                       note: str = "", hint: str = "or unset it to use the manifest's") -> TelemetryConfig:
    """`telemetry` with the OTEL_* variables of `environ` applied (the machine's, or a worker's own). A bad
    value is a ManifestError filed under `where` (default: the setting the variable stands for), `hint` may
    name that setting as {field}; the value is never repeated (it may hold credentials)."""
    try:
        return apply_otel_env(telemetry, environ)
    except ValueError as exc:
        field = getattr(exc, "field", "telemetry")
        raise ManifestError(file, [ManifestProblem(where or field, f"{exc}{note}",
                                                   hint=hint.format(field=field))]) from None
