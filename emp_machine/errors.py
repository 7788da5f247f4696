"""The error hierarchy, by what the caller does next (see STYLE.md section 5)."""

from __future__ import annotations

import errno


class EmpError(Exception):
    """Base of every error emp-machine raises on purpose; the CLI prints these without a traceback."""

    exit_code = 1


class ManifestError(EmpError):
    """The manifest cannot be used: each problem names the file, line, field path and the fix."""

    exit_code = 2

    def __init__(self, file: str, problems: list["ManifestProblem"]):
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{self.file}: {count} problem{'s' if count != 1 else ''} in the manifest"
        return "\n".join([head, *(f"  - {p.render()}" for p in self.problems)])


class ManifestProblem:
    """One thing wrong with a manifest, at one place."""

    __slots__ = ("path", "line", "message", "hint")

    def __init__(self, path: str, message: str, line: int | None = None, hint: str | None = None):
        self.path = path
        self.line = line
        self.message = message
        self.hint = hint

    def render(self) -> str:
        where = self.path or "(top level)"
        if self.line is not None:
            where = f"line {self.line}, {where}"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text

    def __repr__(self) -> str:
        return f"ManifestProblem({self.render()!r})"


class SupervisorError(EmpError):
    """supervisord could not be started, reached or commanded."""

    unreached = False  # True: the call never reached supervisord (nothing listening at its socket)


class NoMachineRunning(EmpError):
    """An operator command found no running machine to talk to."""


class JobError(EmpError):
    """A job failed; the subclass says whether it may run again (see can_retry)."""

    retryable = False


class RetryableJobError(JobError):
    """Worth another attempt: connection refused, timeout, 429, 5xx, service restarted mid-job.

    `retry_after_s` carries a service's own back-off (HTTP Retry-After) for the retry scheduler."""

    retryable = True

    def __init__(self, message: str = "", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnreachable(RetryableJobError):
    """The job never reached its service: connection refused, a DNS failure, a connect timeout (aiohttp's
    ClientConnectorError and its kind), or ComfyUI's WebSocket that could not be opened before the prompt
    went out. The worker checks the connector's health at once: unhealthy, the job goes back to the queue
    without counting an attempt and the worker claims nothing until the service is back; healthy (only this
    job's address is unreachable), the attempt counts as any retryable failure does. Once a job reached its
    service (a prompt submitted, a request sent), losing the service is no longer this error: a job that
    brings its service down must run out of retries."""


class FatalJobError(JobError):
    """Will fail again however often it runs: validation rejected, other 4xx, bad payload."""

    retryable = False


class JobCancelled(EmpError):
    """The job was cancelled by its owner: not a failure, and never marked completed."""


class ConnectorNotFound(EmpError):
    """No installed connector has that name; the message lists those that are."""


class ConnectorLoadError(EmpError):
    """A connector's entry point could not be imported or is not a Connector class."""


class DuplicateWorkerId(EmpError):
    """Another live process holds this worker's id (two machines started with one MACHINE_ID)."""


# OSErrors that say something about this machine, not the job: a full disk, a quota, a read-only or
# unwritable output directory, an exhausted file table, a failing disk. An operator fixes them (or another
# machine runs the job), so they are retryable: permanent, a full disk would fail every job it claims.
_MACHINE_LOCAL_ERRNOS = {
    code: hint for code, hint in (
        (errno.ENOSPC, "free disk space"),
        (getattr(errno, "EDQUOT", None), "free space within the disk quota or raise it"),
        (errno.EROFS, "make the filesystem writable"),
        (errno.EACCES, "fix the permissions of the path named"),
        (errno.EMFILE, "raise the worker's open-file limit (ulimit -n)"),
        (errno.ENFILE, "raise the system's open-file limit (fs.file-max)"),
        (errno.EIO, "check the disk"),
        (errno.ENOTDIR, "make the path named a directory (a file stands where a directory must be)"),
        (errno.EPERM, "fix the permissions or attributes of the path named"),
    ) if code is not None
}


def _machine_local(error: BaseException) -> str | None:
    """The operator's fix when `error` is an OSError about this machine (see _MACHINE_LOCAL_ERRNOS)."""
    if isinstance(error, OSError):
        return _MACHINE_LOCAL_ERRNOS.get(error.errno)
    return None


def machine_local_hint(error: BaseException | None) -> str | None:
    """The operator's fix when `error` is an OSError about this machine (a full disk, a read-only or
    unwritable output directory, an exhausted file table...), or a retryable JobError raised from one
    (`raise RetryableJobError(...) from exc`), else None. A FatalJobError is the connector's own verdict."""
    if isinstance(error, JobError):
        return _machine_local(error.__cause__) if error.retryable and error.__cause__ is not None else None
    return _machine_local(error) if error is not None else None


def can_retry(error: BaseException) -> bool:
    """The one place that maps an exception from a job to the contract's `can_retry`.

    Classified errors say so themselves. Unclassified timeouts and connection errors are transient by
    nature, and OSErrors about this machine (disk full, quota, read-only, permissions) are not the job's
    fault; anything else unexpected is a bug in a connector and would fail again, so it is final."""
    if isinstance(error, JobError):
        return error.retryable
    return isinstance(error, (TimeoutError, ConnectionError)) or _machine_local(error) is not None


def safe_str(exc: BaseException) -> str:
    """str(exc), or a note saying it could not be shown: a plugin's broken __str__ must not break the report of
    its error."""
    try:
        return str(exc)
    except BaseException as inner:  # noqa: BLE001 - see above
        if type(inner).__name__ == "CancelledError":  # asyncio's: the caller is being stopped
            raise
        return "(its message could not be shown: its __str__ raised)"


def describe_exception(exc: BaseException) -> str:
    """`Type: message` (the type alone for an empty message), safe for an exception whose str() raises."""
    text = safe_str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def classify(error: BaseException) -> JobError | JobCancelled:
    """Any exception out of a connector's run, as a classified job outcome (STYLE.md section 3: a plugin
    cannot kill the host). Classified errors pass through; anything else becomes a JobError naming the
    exception type, retryable or not by `can_retry`."""
    if isinstance(error, (JobError, JobCancelled)):
        return error
    cls = RetryableJobError if can_retry(error) else FatalJobError
    message = f"connector raised {type(error).__name__}: {safe_str(error)}"
    hint = _machine_local(error)
    if hint:
        message += f" (this machine's problem, not the job's: {hint})"
    wrapped = cls(message)
    wrapped.__cause__ = error
    return wrapped
