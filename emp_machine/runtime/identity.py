"""machine_id / worker_id / request_id rules, and the Railway and container environment.

Pure functions of what they are given: `manifest.load()` passes the environment in.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from emp_machine.errors import EmpError


@functools.cache
def pid_space() -> str:
    """Names the pid numbering this process sees: the kernel's boot id and this process's pid namespace.
    Two processes with the same pid space can tell by pid whether the other is alive; a container (another
    namespace) or another host cannot. '' when the kernel does not say (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        space = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return hashlib.sha256(f"{boot}/{space}".encode()).hexdigest()[:12]


def token_parts(instance: str) -> tuple[int, str] | None:
    """(pid, pid space) of a worker token (`pid-random-pidspace`: worker.new_instance); None for any other text
    (none, an earlier version's, a tool's)."""
    parts = instance.split("-")
    if len(parts) != 3 or not parts[0].isdigit() or len(parts[2]) != 12:
        return None
    return int(parts[0]), parts[2]


def token_pid_state(instance: str) -> str:
    """What this process can know of the worker process whose token (`pid-random-pidspace`, the `instance` field
    of worker:{id}: worker.new_instance) is `instance`: 'legacy' (not of that form: none, an earlier version's,
    a tool's), 'foreign' (another host or container: its pid says nothing here), 'dead' (this pid space, its
    pid gone, or held now by a process that is no emp-machine worker: the pid was reused) or 'alive' (this
    pid space, its pid an emp-machine worker's, or a process this one may not read)."""
    parts = token_parts(instance)
    if parts is None:
        return "legacy"
    pid, space = parts
    if space != pid_space():
        return "foreign"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError:  # EPERM: a process of another user holds that pid now
        return "alive"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "alive"
    ours = any(b"emp_machine" in arg or b"emp-machine" in arg for arg in argv)  # -m emp_machine, or the script
    return "alive" if ours and b"worker" in argv else "dead"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def machine_id(explicit: str, machine_type: str, environ: Mapping[str, str], hostname: str) -> str:
    """Stable across restarts of the same machine, never a random suffix per boot.

    Order: the manifest's `machine.id`; `MACHINE_ID`; Railway's replica (`{type}-{service}-{replica[:8]}`);
    the host name (`{type}-{hostname}`). A container's host name is stable for its lifetime.
    """
    if explicit:
        return explicit
    if environ.get("MACHINE_ID"):
        return environ["MACHINE_ID"]
    replica = environ.get("RAILWAY_REPLICA_ID", "")
    if replica:
        service = _slug(environ.get("RAILWAY_SERVICE_NAME", ""))
        parts = [machine_type, service, _slug(replica)[:8]]
        return "-".join(p for p in parts if p)
    host = _slug(hostname.split(".")[0]) or "localhost"
    return host if host.startswith(f"{machine_type}-") else f"{machine_type}-{host}"


def worker_id(machine_id_: str, index: int) -> str:
    return f"{machine_id_}-worker-{index}"


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


def default_state_dir(machine_id_: str, environ: Mapping[str, str]) -> str:
    """`$XDG_STATE_HOME/emp-machine/<id>`, else `~/.local/state/emp-machine/<id>`."""
    return str(state_root(environ) / _slug(machine_id_))


class NoStateHome(EmpError):
    """No place for the per-user state: no XDG_STATE_HOME, no HOME, and a uid with no passwd entry (`docker run
    --user N`, OpenShift's random uid), so there is no home directory to put ~/.local/state under."""

    exit_code = 2


def state_root(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME")
    if not base:
        home = environ.get("HOME")
        if not home:
            try:
                home = str(Path.home())
            except (RuntimeError, KeyError, OSError):  # no passwd entry for this uid and HOME unset
                raise NoStateHome(
                    f"no directory for the machine's state: this user (uid {os.getuid()}) has no home directory "
                    "(no passwd entry) and HOME is unset; set machine.state_dir in the manifest (or the "
                    "EMP_MACHINE__STATE_DIR environment variable) to a directory this user can write, or set "
                    "XDG_STATE_HOME (or HOME)") from None
        base = str(Path(home) / ".local" / "state")
    return Path(base) / "emp-machine"


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"',]+")


def redact_urls(text: str) -> str:
    """`text` with every URL in it passed through redact_url (a config file, an error message quoting one)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def redact_url(url: str) -> str:
    """Hide the user info of a URL (the password, and a user name that may be a token) and the values of
    query parameters named like a credential (password, username, token, secret, key...); anything else passes
    unchanged. Text, not a parsed URL: it runs on error paths, so a URL that does not parse (a port that is
    not a number, a broken IPv6 address) is redacted all the same instead of raising or passing through."""
    url = _USERINFO.sub(r"\1***@", url)
    head, mark, query = url.partition("?")
    if not mark:
        return url
    # A query parameter named like a credential (redis-py's from_url takes ?password= and ?username=; other
    # clients ?token=, ?api_key=...): its value goes, up to the next parameter (a "#" may be the password's).
    return head + mark + re.sub(r"(?i)((?:^|[&;])[^=&;#]*(?:pass|pwd|token|secret|key|user|auth|credential|sig)"
                                r"[^=&;#]*=)[^&;]*", r"\1***", query)


_CREDENTIAL_PARAM = re.compile(r"(?i)pass|pwd|token|secret|key|user|auth|credential|sig")


def url_secrets(url: str) -> list[str]:
    """The credentials a URL carries, for exact masking (what redact_url hides): its user info's user and
    password, and the values of query parameters named like a credential, as written and percent-decoded."""
    from urllib.parse import unquote

    found: list[str] = []
    if match := re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)@", url):
        user, colon, password = match.group(1).partition(":")
        # the password; the user name only when it stands alone (a token as user: https://TOKEN@host). A user
        # beside a password is a name (Railway's `default`): masked, it mangled every text holding the word.
        found += [password, unquote(password)] if colon else [user, unquote(user)]
    for part in re.split("[&;]", url.partition("?")[2].partition("#")[0]):
        key, _, value = part.partition("=")
        if value and _CREDENTIAL_PARAM.search(key):
            found += [value, unquote(value)]
    return [value for value in found if value]


def _credential_header(name: str, value: str) -> bool:
    """An OTLP header that carries a credential: named like one (authorization, x-api-key...), or a value shaped
    like a token (16+ characters, letters and digits: Honeycomb's x-honeycomb-team). Not a dataset name
    (`x-honeycomb-dataset: workers`), which masked would mangle every text holding the word."""
    from emp_machine.telemetry.redact import secret_key

    word = value.rpartition(" ")[2]  # "Bearer abc...": the token
    return secret_key(name) or (len(word) >= 16 and any(c.isdigit() for c in word) and any(c.isalpha() for c in word))


def machine_secrets(manifest, environ: Mapping[str, str], groups: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The exact values a process of this machine masks in everything it writes (telemetry.redact's
    set_secret_values): the Redis URL's credentials, every OTLP header value (the manifest's and the
    OTEL_EXPORTER_OTLP_*HEADERS variables'), the health token, the credential-named `env` values of every
    service (their output is shipped by the machine), and each worker group's secret values (`groups`: only
    these; a worker gives its own). `manifest`: the validated Manifest or the running machine's View."""
    from urllib.parse import unquote

    from emp_machine.telemetry.redact import secret_key, secret_values

    found: list[str] = []
    redis_url = str(getattr(manifest.redis, "url", "") or "")
    found += url_secrets(redis_url)
    telemetry = manifest.telemetry
    for headers in (telemetry.otlp_headers, telemetry.otlp_traces.headers, telemetry.otlp_logs.headers,
                    telemetry.otlp_metrics.headers):
        found += [str(value) for name, value in (headers or {}).items() if _credential_header(str(name), str(value))]
    for name, text in environ.items():
        if name.startswith("OTEL_EXPORTER_OTLP_") and name.endswith("HEADERS"):
            for item in text.split(","):
                header, _, value = item.partition("=")
                if _credential_header(unquote(header.strip()), value := unquote(value.strip())):
                    found.append(value)
    if token := environ.get(str(manifest.health.token_env or ""), "").strip():
        found.append(token)
    for service in manifest.services.values():
        found += [str(value) for key, value in (service.env or {}).items() if secret_key(str(key))]
    for name, group in manifest.workers.items():
        if groups is None or name in groups:
            found += secret_values(group.settings, group.env or {}, environ)
    return tuple(sorted({value for value in found if value}, key=len, reverse=True))
