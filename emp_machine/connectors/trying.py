"""`emp-machine try`: one job through one connector, no Redis, no supervisor (the CLI wiring is elsewhere).

Prints a line per progress report, then the result with its output file paths (exit 0), or the classified
error with the service's own message (exit 1). How a developer checks a connector against a real service
before deploying a manifest.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


from emp_machine.connectors.base import ConnectorContext, ConnectorJob
from emp_machine.connectors.registry import ConnectorRegistry
from emp_machine.errors import ConnectorLoadError, ConnectorNotFound, JobCancelled, classify, describe_exception


async def try_connector(name: str, settings: dict[str, Any], payload: Any, output_dir: str | Path,
                        print_fn: Callable[[str], None] = print,
                        registry: ConnectorRegistry | None = None) -> int:
    registry = registry or ConnectorRegistry.discover()
    try:
        cls = registry.get(name)
    except (ConnectorNotFound, ConnectorLoadError) as exc:
        print_fn(f"error: {exc}")
        return 1
    context = ConnectorContext(machine_id="try", worker_id="try-worker-0", output_dir=Path(output_dir),
                               service_type=name)
    try:
        connector = cls.from_settings(settings, context)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise  # the caller (or the person at the terminal) is stopping
    except BaseException as exc:  # noqa: BLE001 - a plugin's __init__ failing (even SystemExit) is its error
        print_fn(f"error: {registry.construction_failure(name, exc)}")
        return 1
    job = ConnectorJob(id=f"try-{uuid.uuid4().hex[:12]}", service_required=name, payload=payload)

    async def progress(percent: float, message: str) -> None:
        print_fn(f"progress {percent:5.1f}% {message}")

    try:
        result = await connector.run(job, progress)
    except BaseException as exc:  # noqa: BLE001 - a connector's bug must end as a classified exit 1
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt / CancelledError: the caller is stopping
        outcome = classify(exc)  # safe for an exception whose str() raises
        if isinstance(outcome, JobCancelled):
            print_fn(f"cancelled: {outcome}")
        else:
            kind = "retryable" if outcome.retryable else "permanent"
            print_fn(f"failed ({kind}): {outcome}")
        return 1
    finally:
        try:
            await connector.close()
        except Exception as exc:  # closing must not hide the job's outcome
            print_fn(f"warning: closing the connector failed: {describe_exception(exc)}")
    print_fn("completed")
    for output in result.outputs:
        print_fn(f"output {output.path} ({output.mime_type}, {output.size_bytes} bytes)")
    print_fn("result " + json.dumps(result.to_json(), default=str))
    return 0
