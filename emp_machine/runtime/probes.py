"""Service health checks (HTTP or TCP) with start period and retries, reporting transitions to the machine.

A probe only reports: it puts a HealthChanged-like event on the machine's inbox when its verdict changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from emp_machine.runtime.identity import redact_urls
from emp_machine.runtime.plan import Probe


async def check_once(probe: Probe, session: aiohttp.ClientSession | None) -> str | None:
    """None when healthy, else the reason."""
    try:
        if probe.url is not None:
            assert session is not None
            async with session.get(probe.url, timeout=aiohttp.ClientTimeout(total=probe.timeout)) as resp:
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status} from {probe.describe()}"
        # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that lands as the connect
        # completes, and the probe went on checking after the machine's shutdown had cancelled it (reporting
        # the service it was stopping unhealthy)
        async with asyncio.timeout(probe.timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", probe.tcp_port)
        writer.close()
        await writer.wait_closed()
        return None
    except asyncio.TimeoutError:
        return f"no answer from {probe.describe()} within {probe.timeout:g}s"
    except Exception as exc:  # noqa: BLE001 - any failure is a failed check (a port past 65535 raised OverflowError
        # and ended the probe without a word: the machine stayed `starting` for ever)
        # aiohttp's text may quote a URL: ours as yarl normalised it (%21 as !), or a redirect's target
        text = redact_urls(str(exc))
        return f"{probe.describe()}: {exc.__class__.__name__}: {text}"


async def run_probe(process: str, probe: Probe, inbox: asyncio.Queue, event: Callable,
                    started: Callable[[str], tuple[int, float]]) -> None:
    """Check forever. Healthy on the first success; unhealthy after `retries` failures past the start period.

    `started(process)` gives (pid, start epoch) of the current process; a new pid restarts the start period.
    """
    verdict: bool | None = None
    failures = 0
    seen_pid = 0
    first_seen = time.time()
    session = aiohttp.ClientSession() if probe.url else None
    try:
        while True:
            pid, start = started(process)
            if pid != seen_pid:
                seen_pid, failures = pid, 0
                first_seen = start or time.time()
            reason = await check_once(probe, session)
            if reason is None:
                failures = 0
                if verdict is not True:
                    verdict = True
                    inbox.put_nowait(event(process, True, ""))
            else:
                failures += 1
                in_start_period = time.time() - first_seen < probe.start_period
                if failures >= probe.retries and not (in_start_period and verdict is not True):
                    if verdict is not False:
                        verdict = False
                        inbox.put_nowait(event(process, False, reason))
            # Poll fast until the first success so gated workers start promptly; then at the interval.
            await asyncio.sleep(probe.interval if verdict else min(probe.interval, 0.1))
    finally:
        if session is not None:
            await session.close()
