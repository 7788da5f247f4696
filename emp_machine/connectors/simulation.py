"""The simulation connector: no external service; the demo, load-test and failure-test connector.

Payload fields (all optional): `steps` (5), `step_ms` (100), `output_bytes` (0: no file), `fail_at_step`
(fail when that step is reached), `fail_retryable` (true), `fail_message` (that failure's error text, as a
service's error would read), `fail_attempts` (fail retryably on the first N
attempts, then succeed: the demo's retried job), `hang` (after the steps, never finish until
cancelled: for timeout and cancel tests). Output bytes go to a file under the context's output
directory, and the result carries its path, never the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from emp_machine.connectors._http import job_dir, ms_since
from emp_machine.connectors.base import (
    Connector, ConnectorJob, ConnectorSettings, Health, JobResult, OutputFile, ProgressFn,
)
from emp_machine.errors import FatalJobError, JobCancelled, RetryableJobError, can_retry

_WRITE_CHUNK = 1 << 20


class SimulationSettings(ConnectorSettings):
    # When set, health() reports unhealthy with this reason: lets tests drive health-gated behaviour.
    unhealthy_reason: str | None = None
    # How long health() takes: a slow service's health check, for tests of what waits on it.
    health_delay_ms: float = Field(default=0, ge=0, allow_inf_nan=False)
    max_output_bytes: int = Field(default=1 << 30, ge=0)


class SimulationPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    steps: int = Field(default=5, ge=0, le=1_000_000)
    step_ms: float = Field(default=100, ge=0, allow_inf_nan=False)
    output_bytes: int = Field(default=0, ge=0)
    fail_at_step: int | None = Field(default=None, ge=1)
    fail_retryable: bool = True
    fail_message: str | None = Field(default=None, max_length=2000)
    fail_attempts: int = Field(default=0, ge=0)  # fail (retryable) on the first N attempts, then succeed
    hang: bool = False


class SimulationConnector(Connector):
    name = "simulation"
    Settings = SimulationSettings
    settings: SimulationSettings

    def __init__(self, settings: SimulationSettings, context):
        super().__init__(settings, context)
        self._cancel_events: dict[str, asyncio.Event] = {}

    async def health(self) -> Health:
        if self.settings.health_delay_ms:
            await asyncio.sleep(self.settings.health_delay_ms / 1000)
        if self.settings.unhealthy_reason:
            return Health(False, self.settings.unhealthy_reason)
        return Health(True)

    async def cancel(self, job_id: str) -> None:
        event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()

    async def run(self, job: ConnectorJob, progress: ProgressFn) -> JobResult:
        spec = self._parse(job.payload)
        cancelled = self._cancel_events.setdefault(job.id, asyncio.Event())
        started = time.monotonic()
        self.joblog.received(job.id, steps=spec.steps)
        try:
            await progress(0, "started")
            if job.attempt <= spec.fail_attempts:
                raise RetryableJobError(f"simulated transient failure on attempt {job.attempt} "
                                        f"(fails the first {spec.fail_attempts})")
            for step in range(1, spec.steps + 1):
                if spec.fail_at_step == step:
                    error = RetryableJobError if spec.fail_retryable else FatalJobError
                    raise error(spec.fail_message or f"simulated failure at step {step} of {spec.steps}")
                await self._sleep(spec.step_ms / 1000, cancelled, job.id)
                await progress(step * 100 / spec.steps, f"step {step}/{spec.steps}")
            if spec.fail_at_step is not None and spec.fail_at_step > spec.steps:
                raise FatalJobError(f"fail_at_step {spec.fail_at_step} is past the last step ({spec.steps})")
            if spec.hang:
                await cancelled.wait()
                raise JobCancelled(f"job {job.id} cancelled while hanging")
            outputs = [self._write_output(job.id, spec.output_bytes)] if spec.output_bytes else []
            self.joblog.completed(job.id, ms_since(started), steps=spec.steps)
            return JobResult(data={"steps": spec.steps}, outputs=outputs,
                             service_metadata={"connector": self.name, "attempt": job.attempt})
        except JobCancelled:
            self.joblog.event("job.cancelled", job.id, steps=spec.steps)
            raise
        except Exception as exc:
            self.joblog.failed(job.id, exc, ms_since(started), can_retry(exc), steps=spec.steps)
            raise
        finally:
            self._cancel_events.pop(job.id, None)

    def _parse(self, payload: object) -> SimulationPayload:
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise FatalJobError(f"simulation payload must be a JSON object, got {type(payload).__name__}")
        try:
            spec = SimulationPayload.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise FatalJobError(f"bad simulation payload: {problems}") from None
        if spec.output_bytes > self.settings.max_output_bytes:
            raise FatalJobError(f"output_bytes {spec.output_bytes} exceeds max_output_bytes "
                                f"{self.settings.max_output_bytes}")
        return spec

    @staticmethod
    async def _sleep(seconds: float, cancelled: asyncio.Event, job_id: str) -> None:
        try:
            await asyncio.wait_for(cancelled.wait(), seconds)
        except TimeoutError:
            return
        raise JobCancelled(f"job {job_id} cancelled")

    def _write_output(self, job_id: str, size: int) -> OutputFile:
        # Written synchronously: simulation outputs are small; a real connector streams to disk.
        # The job id comes from whoever submitted the job: job_dir keeps '../' and '/' out of the path.
        directory = job_dir(self.context.output_dir, job_id)
        path = directory / "simulation.bin"
        chunk = bytes(range(256)) * (_WRITE_CHUNK // 256)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as out:
                left = size
                while left:
                    n = min(left, len(chunk))
                    out.write(chunk[:n])
                    left -= n
        except BaseException:
            # A failed write (disk full, quota) leaves no partial file behind to be mistaken for output.
            with contextlib.suppress(OSError):  # never hide the write's own error behind the clean-up's
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # nor an empty job folder (one per failed job, seen 100)
                directory.rmdir()
            raise
        return OutputFile(str(path), "application/octet-stream", size)
