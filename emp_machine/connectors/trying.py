"""`emp-machine try`: one job through one connector, no Redis, no supervisor (the CLI wiring is elsewhere).

Prints a line per progress report, then the result with its output file paths (exit 0), or the classified
error with the service's own message (exit 1). How a developer checks a connector against a real service
before deploying a manifest.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


from emp_machine.connectors.base import ConnectorContext, ConnectorJob
from emp_machine.connectors.registry import ConnectorRegistry
from emp_machine.errors import ConnectorLoadError, ConnectorNotFound, JobCancelled, classify, describe_exception
from emp_machine.telemetry.redact import mask_values, redact_text, secret_values, set_secret_values


async def try_connector(name: str, settings: dict[str, Any], payload: Any, output_dir: str | Path,
                        print_fn: Callable[[str], None] = print,
                        registry: ConnectorRegistry | None = None) -> int:
    registry = registry or ConnectorRegistry.discover()
    # As a worker does: the settings' credentials (and the variables `*_env` settings name) are masked in what
    # is printed and in every log record, a plain value too; the result by value only.
    secrets = secret_values(settings, {}, os.environ)
    set_secret_values(secrets)

    def say(line: str) -> None:
        print_fn(redact_text(line))

    # The connector's log records (and its libraries'), shown on stderr as Python's last-resort handler would,
    # masked likewise: that handler printed a plugin's `log.warning("using %s", key)` as it came.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting())
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        return await _try(name, settings, payload, output_dir, say, print_fn, secrets, registry)
    finally:
        logging.getLogger().removeHandler(handler)


class _Redacting(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


async def _try(name: str, settings: dict[str, Any], payload: Any, output_dir: str | Path,
               say: Callable[[str], None], print_fn: Callable[[str], None], secrets: tuple[str, ...],
               registry: ConnectorRegistry) -> int:
    """try_connector's run: `say` prints a line redacted, `print_fn` as it is (the result, masked by value)."""
    try:
        cls = registry.get(name)
    except (ConnectorNotFound, ConnectorLoadError) as exc:
        say(f"error: {exc}")
        return 1
    context = ConnectorContext(machine_id="try", worker_id="try-worker-0", output_dir=Path(output_dir),
                               service_type=name)
    try:
        connector = cls.from_settings(settings, context)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise  # the caller (or the person at the terminal) is stopping
    except BaseException as exc:  # noqa: BLE001 - a plugin's __init__ failing (even SystemExit) is its error
        say(f"error: {registry.construction_failure(name, exc)}")
        return 1
    job = ConnectorJob(id=f"try-{uuid.uuid4().hex[:12]}", service_required=name, payload=payload)

    async def progress(percent: float, message: str) -> None:
        say(f"progress {percent:5.1f}% {message}")

    try:
        result = await connector.run(job, progress)
    except BaseException as exc:  # noqa: BLE001 - a connector's bug must end as a classified exit 1
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / CancelledError: the caller is stopping
        outcome = classify(exc)  # safe for an exception whose str() raises
        if isinstance(outcome, JobCancelled):
            say(f"cancelled: {outcome}")
        else:
            kind = "retryable" if outcome.retryable else "permanent"
            say(f"failed ({kind}): {outcome}")
        return 1
    finally:
        try:
            await connector.close()
        except Exception as exc:  # closing must not hide the job's outcome
            say(f"warning: closing the connector failed: {describe_exception(exc)}")
    say("completed")
    for output in result.outputs:
        say(f"output {output.path} ({output.mime_type}, {output.size_bytes} bytes)")
    print_fn("result " + json.dumps(mask_values(result.to_json(), secrets), default=str))
    return 0
