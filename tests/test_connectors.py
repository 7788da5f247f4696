"""The connector interface, the registry and the simulation connector."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from pydantic import ValidationError

from emp_machine.connectors._http import job_dir
from emp_machine.connectors.base import ConnectorContext, ConnectorJob
from emp_machine.connectors.registry import GROUP, ConnectorRegistry
from emp_machine.connectors.simulation import SimulationConnector
from emp_machine.errors import (
    ConnectorLoadError, ConnectorNotFound, FatalJobError, JobCancelled, RetryableJobError, can_retry, classify,
)


@pytest.fixture
def context(tmp_path):
    return ConnectorContext(machine_id="m1", worker_id="m1-worker-0", output_dir=tmp_path)


def sim(context, **settings):
    return SimulationConnector.from_settings(settings, context)


def run(connector, payload, job_id="j1"):
    seen: list[tuple[float, str]] = []

    async def progress(percent, message):
        seen.append((percent, message))

    async def main():
        return await connector.run(ConnectorJob(job_id, "simulation", payload), progress)
    return asyncio.run(main()), seen


def test_simulation_success_reports_each_step_and_writes_output_by_reference(context, tmp_path):
    result, seen = run(sim(context), {"steps": 4, "step_ms": 1, "output_bytes": 3000})
    assert [p for p, _ in seen] == [0, 25, 50, 75, 100]
    assert seen[-1][1] == "step 4/4"
    [out] = result.outputs
    assert out.size_bytes == 3000 and out.mime_type == "application/octet-stream"
    assert out.path.startswith(str(tmp_path)) and len(open(out.path, "rb").read()) == 3000
    encoded = json.dumps(result.to_json())
    assert len(encoded) < 500  # a reference, not the bytes
    assert result.to_json()["service_metadata"]["connector"] == "simulation"


def test_simulation_defaults(context):
    result, seen = run(sim(context), {"step_ms": 0})
    assert len(seen) == 6 and result.outputs == [] and result.data == {"steps": 5}


@pytest.mark.parametrize("retryable,error", [(True, RetryableJobError), (False, FatalJobError)])
def test_simulation_fails_at_the_given_step(context, retryable, error):
    connector = sim(context)
    seen = []

    async def progress(percent, message):
        seen.append(percent)

    async def main():
        await connector.run(ConnectorJob("j1", "simulation",
                                         {"steps": 4, "step_ms": 0, "fail_at_step": 3, "fail_retryable": retryable}),
                            progress)
    with pytest.raises(error, match="step 3 of 4") as caught:
        asyncio.run(main())
    assert seen == [0, 25, 50]
    assert can_retry(caught.value) is retryable


@pytest.mark.parametrize("payload,fragment", [
    ({"steps": -1}, "steps"),
    ({"step_ms": "slow"}, "step_ms"),
    ([1, 2], "must be a JSON object"),
    ({"steps": 2, "fail_at_step": 9, "step_ms": 0}, "past the last step"),
])
def test_bad_payload_is_a_fatal_error_naming_the_field(context, payload, fragment):
    with pytest.raises(FatalJobError, match=fragment):
        run(sim(context), payload)


def test_output_larger_than_allowed_is_rejected(context):
    with pytest.raises(FatalJobError, match="max_output_bytes"):
        run(sim(context, max_output_bytes=10), {"output_bytes": 11, "step_ms": 0})


@pytest.mark.parametrize("job_id", ["../../escaped/x", "a/b", "{tmp}/abs/c", "..", "../.."])
def test_simulation_output_stays_inside_the_output_dir_whatever_the_job_id(tmp_path, job_id):
    job_id = job_id.format(tmp=tmp_path)  # an absolute id, kept under tmp_path should the fix ever regress
    root = tmp_path / "outputs"
    context = ConnectorContext(machine_id="m1", worker_id="m1-worker-0", output_dir=root)
    result, _ = run(sim(context), {"steps": 1, "step_ms": 0, "output_bytes": 16}, job_id=job_id)
    [out] = result.outputs
    path = Path(out.path)
    assert ".." not in path.parts and path.resolve().is_relative_to(root.resolve()) and path.stat().st_size == 16
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [path]


@pytest.mark.parametrize("ids", [("a/b", "c/b"), ("x:1", "x_1"), ("../j", "j"), ("..", "...")])
def test_job_ids_that_differ_only_in_unsafe_characters_never_share_an_output_directory(tmp_path, ids):
    # A second job's output must not overwrite (or be returned for) the first's: each id has its own folder.
    root = tmp_path / "outputs"
    context = ConnectorContext(machine_id="m1", worker_id="m1-worker-0", output_dir=root)
    paths = []
    for job_id in ids:
        result, _ = run(sim(context), {"steps": 1, "step_ms": 0, "output_bytes": 16}, job_id=job_id)
        [out] = result.outputs
        paths.append(Path(out.path))
    assert paths[0].parent != paths[1].parent and all(p.stat().st_size == 16 for p in paths)
    assert all(p.resolve().is_relative_to(root.resolve()) for p in paths)
    assert job_dir(root, "job-7f3a") == root / "job-7f3a"  # a plain id stays readable


def test_simulation_disk_full_is_retryable_and_leaves_no_output_file(context, tmp_path):
    # A real ENOSPC: the output file's name is a link to /dev/full, which refuses every write.
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    (tmp_path / "j1").mkdir()
    (tmp_path / "j1" / "simulation.bin").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        run(sim(context), {"steps": 1, "step_ms": 0, "output_bytes": 3 << 20})
    assert caught.value.errno == errno.ENOSPC and can_retry(caught.value) is True
    outcome = classify(caught.value)
    assert isinstance(outcome, RetryableJobError) and "free disk space" in str(outcome)
    assert not os.path.lexists(tmp_path / "j1" / "simulation.bin")


def test_simulation_failed_write_removes_the_partial_file(tmp_path):
    # A write that fails part-way (here the process's file-size limit, in a child so the limit stays
    # there) must not leave the bytes it got out before failing.
    script = textwrap.dedent(f"""
        import asyncio, resource, signal
        from emp_machine.connectors.base import ConnectorContext, ConnectorJob
        from emp_machine.connectors.simulation import SimulationConnector
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        conn = SimulationConnector.from_settings({{}}, ConnectorContext("m1", "w0", output_dir={str(tmp_path)!r}))
        async def progress(p, m): pass
        try:
            asyncio.run(conn.run(ConnectorJob("j1", "simulation", {{"steps": 0, "output_bytes": 3 << 20}}), progress))
        except OSError as exc:
            print("errno", exc.errno)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"errno {errno.EFBIG}"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_hang_until_cancelled(context):
    connector = sim(context)

    async def main():
        async def progress(percent, message):
            pass
        task = asyncio.create_task(connector.run(ConnectorJob("j1", "simulation", {"hang": True, "steps": 1,
                                                                                 "step_ms": 0}), progress))
        done, _ = await asyncio.wait({task}, timeout=0.2)
        assert not done  # it hangs
        await connector.cancel("j1")
        with pytest.raises(JobCancelled):
            await asyncio.wait_for(task, 5)
        await connector.cancel("j1")  # idempotent once gone
    asyncio.run(main())


def test_cancel_during_steps_stops_at_once(context):
    connector = sim(context)
    seen = []

    async def main():
        async def progress(percent, message):
            seen.append(percent)
            if percent == 0:
                asyncio.get_running_loop().call_later(0.05, asyncio.ensure_future, connector.cancel("j1"))
        await connector.run(ConnectorJob("j1", "simulation", {"steps": 5, "step_ms": 10_000}), progress)
    with pytest.raises(JobCancelled):
        asyncio.run(asyncio.wait_for(main(), 5))
    assert seen == [0]  # cancel happened inside step 1's wait, long before 10 s


def test_health_and_settings_validation(context):
    assert asyncio.run(sim(context).health()).healthy is True
    health = asyncio.run(sim(context, unhealthy_reason="gpu lost").health())
    assert (health.healthy, health.reason) == (False, "gpu lost")
    with pytest.raises(ValidationError, match="no_such_setting"):
        sim(context, no_such_setting=1)


def test_context_defaults_to_stdlib_logging(context):
    assert context.logger.name == "emp_machine.connectors" and context.tracer is None


def test_registry_finds_the_installed_simulation_connector():
    registry = ConnectorRegistry.discover()
    assert "simulation" in registry.names()
    assert registry.get("simulation") is SimulationConnector


def test_unknown_connector_lists_installed_and_nearest():
    registry = ConnectorRegistry.discover()
    with pytest.raises(ConnectorNotFound) as caught:
        registry.get("simulaton")
    assert "installed: " in str(caught.value) and "simulation" in str(caught.value)
    assert "did you mean 'simulation'?" in str(caught.value)
    with pytest.raises(ConnectorNotFound) as caught:
        registry.get("zzzz")
    assert "did you mean" not in str(caught.value)


def test_broken_entry_point_is_reported_while_others_load():
    found = [
        EntryPoint("simulation", "emp_machine.connectors.simulation:SimulationConnector", GROUP),
        EntryPoint("broken", "emp_no_such_module_xyz:Thing", GROUP),
        EntryPoint("notaclass", "emp_machine.connectors.registry:GROUP", GROUP),
    ]
    registry = ConnectorRegistry.discover(found)
    assert registry.names() == ["simulation"]
    failures = {f.name: f for f in registry.failures}
    assert failures["broken"].entry_point == "emp_no_such_module_xyz:Thing"
    assert "ModuleNotFoundError" in failures["broken"].error
    assert "not a Connector subclass" in failures["notaclass"].error
    with pytest.raises(ConnectorLoadError, match="emp_no_such_module_xyz:Thing"):
        registry.get("broken")
    with pytest.raises(ConnectorNotFound, match="did you mean 'broken'"):
        registry.get("brokn")


def test_can_retry_maps_errors_to_outcomes():
    assert can_retry(RetryableJobError("x")) is True
    assert can_retry(FatalJobError("x")) is False
    assert can_retry(TimeoutError()) is True and can_retry(ConnectionRefusedError()) is True
    assert can_retry(KeyError("bug")) is False


@pytest.mark.parametrize("code,hint", [
    (errno.ENOSPC, "free disk space"), (errno.EDQUOT, "disk quota"), (errno.EROFS, "writable"),
    (errno.EACCES, "permissions"), (errno.EMFILE, "open-file limit"), (errno.ENFILE, "open-file limit"),
    (errno.EIO, "check the disk"),
])
def test_machine_local_os_errors_are_retryable(code, hint):
    # A full disk (or quota, read-only mount, permissions) is this machine's problem: failing the job for
    # good would let one full disk permanently fail every job its workers claim.
    error = OSError(code, os.strerror(code), "/outputs/w0/j1/simulation.bin")
    assert can_retry(error) is True
    outcome = classify(error)
    assert isinstance(outcome, RetryableJobError) and outcome.__cause__ is error
    assert str(outcome).startswith(f"connector raised {type(error).__name__}: [Errno {code}]")
    assert "/outputs/w0/j1/simulation.bin" in str(outcome) and hint in str(outcome)
    assert can_retry(PermissionError(errno.EACCES, "Permission denied")) is True


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "No such file or directory"), IsADirectoryError(errno.EISDIR, "Is a directory"),
    OSError(errno.EFBIG, "File too large"), OSError("no errno"), ValueError("bug"),
])
def test_other_unclassified_errors_stay_final(error):
    assert can_retry(error) is False
    outcome = classify(error)
    assert isinstance(outcome, FatalJobError) and "this machine's problem" not in str(outcome)


def test_a_worker_registry_names_every_installed_connector_when_its_own_is_missing():
    # for_connector imports only the worker's own entry point; a typo used to say "installed: (none)".
    registry = ConnectorRegistry.for_connector("simulaton")
    with pytest.raises(Exception) as caught:
        registry.get("simulaton")
    text = str(caught.value)
    assert "installed: a1111, comfyui, openai, rest, simulation" in text and "did you mean 'simulation'" in text
    assert registry.names() == []  # nothing was imported for it
