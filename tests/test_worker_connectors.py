"""Each connector through a real worker process against its fake service: success with progress, an error
class (permanent or retryable, as the contract's can_retry), and cancel the way the EMP API does. A
third-party connector that raises an unexpected exception fails only its job."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import redis as redis_lib
from fakes.a1111 import OOM, FakeA1111
from fakes.comfyui import FakeComfyUI
from fakes.openai import QUOTA, FakeOpenAI
from test_connector_comfyui import happy, sleeper
from test_connector_rest import TOKEN, Service

from emp_machine.runtime.jobs import JobStore
from _helpers import install_plugin
from harness import Messages, WorkerProcs, wait_for

KEY = "sk-test-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
PLUGIN = '''
from emp_machine.connectors.base import Connector, JobResult


class EchoConnector(Connector):
    name = "echo"

    async def run(self, job, progress):
        await progress(50, "halfway")
        return JobResult(data={"echo": job.payload})


class BoomConnector(Connector):
    name = "boom"

    async def run(self, job, progress):
        return {}["a bug in a plugin"]


class MarkConnector(Connector):
    """Leaves a file for each cancel() it gets (in the folder its job names), hangs, or cancels itself."""
    name = "mark"
    folders = {}

    async def cancel(self, job_id):
        import pathlib
        pathlib.Path(self.folders[job_id], f"cancelled-{job_id}").write_text("cancel() called")

    async def run(self, job, progress):
        import asyncio
        from emp_machine.errors import JobCancelled
        self.folders[job.id] = job.payload["folder"]
        await progress(50, "half")
        if job.payload.get("mode") == "self_cancel":  # a service interrupted by hand: nobody asked
            raise JobCancelled("the service was interrupted by hand")
        await asyncio.Event().wait()
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    install_plugin(site, "emp_plugin_w", PLUGIN, {"echo": "EchoConnector", "boom": "BoomConnector",
                                                  "mark": "MarkConnector"})
    sys.path.insert(0, str(site))  # the manifest is validated here too, against installed connectors
    yield site
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def fakes():
    servers = {"comfyui": FakeComfyUI(node_s=0.12).start(), "a1111": FakeA1111(step_s=0.03).start(),
               "openai": FakeOpenAI(KEY).start()}
    rest = Service()
    yield {**servers, "rest": rest}
    for server in servers.values():
        server.close()
    rest.thread.close()


@pytest.fixture(scope="module")
def client(redis_server):
    c = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    c.flushall()
    yield c
    c.close()


@pytest.fixture(scope="module")
def workers(client, redis_server, fakes, plugin_site, tmp_path_factory):
    rest = fakes["rest"].thread.url
    body = textwrap.dedent(f"""
    workers:
      comfy:
        connector: comfyui
        settings: {{base_url: "{fakes['comfyui'].url}"}}
      a1111:
        connector: a1111
        settings: {{base_url: "{fakes['a1111'].url}", progress_interval_s: 0.02}}
      openai:
        connector: openai
        settings: {{base_url: "{fakes['openai'].url}", api_key_env: EMP_TEST_OPENAI_KEY, max_retries: 0}}
        env: {{EMP_TEST_OPENAI_KEY: "{KEY}"}}
      rest:
        connector: rest
        job_types: [rest-sync]
        settings: {{submit_url: "{rest}/run", result_path: output,
                    header_env: {{Authorization: EMP_TEST_TOKEN}}}}
        env: {{EMP_TEST_TOKEN: "Bearer {TOKEN}"}}
      restasync:
        connector: rest
        job_types: [rest-async]
        settings: {{mode: async, submit_url: "{rest}/tasks", status_url: "{rest}/tasks/{{{{task.id}}}}",
                    cancel_url: "{rest}/tasks/{{{{task.id}}}}/cancel", status_path: state,
                    progress_path: percent, progress_scale: 100, result_path: result,
                    error_path: error.message, poll_interval_s: 0.05}}
      plugins:
        connector: echo
        job_types: [echo, boom-echo]
      boom:
        connector: boom
      mark:
        connector: mark
        job_types: [mark, mark-timeout]
        lease: 3s
        job_timeouts: {{mark-timeout: 1s}}
    """)
    procs = WorkerProcs(body, tmp_path_factory.mktemp("cw"), redis_server.url,
                        environ={"PYTHONPATH": str(plugin_site)})
    with procs.running(client, timeout=40):
        yield procs


@pytest.fixture
def store(client, workers):
    return JobStore(client)


@pytest.fixture
def messages(client):
    msgs = Messages(client, "update_job_progress", "complete_job", "job_failed")
    yield msgs
    msgs.close()


def finished(client, job_id, timeout=15.0):
    return wait_for(lambda: client.hget(f"job:{job_id}", "status") in ("completed", "failed")
                    and client.hgetall(f"job:{job_id}"), timeout, message=f"job {job_id} to end")


def result_of(client, job_id):
    return json.loads(client.hget("jobs:completed", job_id))["data"]


def progress_of(messages, job_id):
    return [m["progress"] for m in messages.of("update_job_progress", job_id=job_id)]


def one_failure(messages, job_id):
    (msg,) = wait_for(lambda: messages.of("job_failed", job_id=job_id), message="job_failed")
    return msg


def cancel_when_running(client, store, messages, job_id, at_progress=0.0):
    wait_for(lambda: any(p > at_progress for p in progress_of(messages, job_id)) or
             client.hget(f"job:{job_id}", "status") in ("completed", "failed"), message="the job to run")
    assert store.cancel(job_id, "user pressed stop")
    wid = client.hget(f"job:{job_id}", "worker_id")
    wait_for(lambda: not client.hexists(f"jobs:active:{wid}", job_id), message="the worker to let go")
    job = client.hgetall(f"job:{job_id}")
    assert (job["status"], job["error"]) == ("failed", "Job cancelled by user")
    assert not client.hexists("jobs:completed", job_id) and not messages.of("complete_job", job_id=job_id)


def test_comfyui_through_the_worker(client, store, messages, fakes):
    ok = store.submit("comfyui", {"workflow": happy()})
    job = finished(client, ok)
    assert job["status"] == "completed", job.get("error")
    result = result_of(client, ok)
    assert [o["mime_type"] for o in result["outputs"]] == ["image/png", "image/png"]
    assert "base64" not in json.dumps(result)
    percents = progress_of(messages, ok)
    assert percents[0] == 0 and percents[-1] == 100 and any(0 < p < 100 for p in percents), percents

    bad = store.submit("comfyui", {"workflow": {**happy(), "2": {"class_type": "NoSuchNode", "inputs": {}}}})
    assert finished(client, bad)["status"] == "failed"
    msg = one_failure(messages, bad)
    assert msg["can_retry"] is False and "NoSuchNode does not exist" in msg["error"]

    slow = store.submit("comfyui", {"workflow": sleeper(30)})
    cancel_when_running(client, store, messages, slow)
    wait_for(lambda: fakes["comfyui"].interrupt_calls, message="ComfyUI interrupted")


def test_a1111_through_the_worker(client, store, messages, fakes, workers):
    ok = store.submit("a1111", {"prompt": "a cat", "steps": 8, "width": 16, "height": 16})
    job = finished(client, ok)
    assert job["status"] == "completed", job.get("error")
    result = result_of(client, ok)
    assert len(result["outputs"]) == 1 and result["outputs"][0]["mime_type"] == "image/png"
    percents = progress_of(messages, ok)
    assert percents[0] == 0 and percents[-1] == 100 and any(0 < p < 100 for p in percents), percents

    fakes["a1111"].fail_next = OOM
    oom = store.submit("a1111", {"steps": 2, "width": 8, "height": 8}, max_retries=1)
    assert finished(client, oom)["status"] == "failed"
    assert "CUDA out of memory" in one_failure(messages, oom)["error"]
    # classified retryable (max_retries=1 leaves no attempt: with one a1111 worker a retry would wait out
    # the claim's avoid_reclaim_s, 10 s)
    # the worker logs job.failed after its failure reached Redis: waited for, not read at once
    logged = wait_for(lambda: [json.loads(line) for line in workers.log(1).splitlines()
                               if oom in line and '"message":"job.failed"' in line and '"retryable"' in line],
                      5, message="the worker's job.failed line")
    assert logged[0]["retryable"] is True
    rejected = store.submit("a1111", {"steps": 2, "sampler_name": "Nope"})
    assert finished(client, rejected)["status"] == "failed"
    msg = one_failure(messages, rejected)
    assert msg["can_retry"] is False and "Sampler not found" in msg["error"]

    long = store.submit("a1111", {"steps": 400, "width": 8, "height": 8})
    cancel_when_running(client, store, messages, long)
    wait_for(lambda: ("POST", "/sdapi/v1/interrupt") in [r[:2] for r in fakes["a1111"].requests],
             message="A1111 interrupted")


def test_openai_through_the_worker(client, store, messages, fakes):
    server = fakes["openai"]
    ok = store.submit("openai", {"model": "gpt-image-1", "prompt": "a fox", "n": 1, "size": "32x24"})
    job = finished(client, ok)
    assert job["status"] == "completed", job.get("error")
    result = result_of(client, ok)
    assert result["outputs"][0]["mime_type"] == "image/png" and "b64_json" not in json.dumps(result)
    assert progress_of(messages, ok)[-1] == 100
    assert KEY not in json.dumps(result)

    server.script = [QUOTA]
    quota = store.submit("openai", {"model": "m", "prompt": "p"})
    assert finished(client, quota)["status"] == "failed"
    msg = one_failure(messages, quota)
    assert msg["can_retry"] is False and "insufficient_quota" in msg["error"]

    server.delay_s = 30
    try:
        slow = store.submit("openai", {"model": "m", "prompt": "p"})
        wait_for(lambda: client.hget(f"job:{slow}", "status") == "in_progress", message="openai job running")
        cancel_when_running(client, store, messages, slow, at_progress=-1)
    finally:
        server.delay_s = 0


def test_rest_sync_and_async_through_the_worker(client, store, messages, fakes):
    ok = store.submit("rest-sync", {"numbers": [1, 2, 3]})
    job = finished(client, ok)
    assert job["status"] == "completed", job.get("error")
    assert result_of(client, ok)["data"] == {"sum": 6}

    forced = store.submit("rest-sync", {"numbers": [1], "status": 422})
    assert finished(client, forced)["status"] == "failed"
    assert one_failure(messages, forced)["can_retry"] is False

    inline = store.submit("rest-sync", {"numbers": [2], "inline_image_bytes": 64 * 1024})
    assert finished(client, inline)["status"] == "completed"
    result = result_of(client, inline)
    (image,) = result["outputs"]  # the inline image became a file, referenced in data and in outputs
    assert result["data"] == {"sum": 2, "image": image} and image["mime_type"] == "image/png"
    stored = Path(image["path"]).read_bytes()
    assert stored.startswith(b"\x89PNG") and len(stored) == image["size_bytes"] == 8 + 64 * 1024
    assert "base64" not in client.hget("jobs:completed", inline)

    polled = store.submit("rest-async", {})
    assert finished(client, polled)["status"] == "completed"
    assert result_of(client, polled)["data"] == {"url": "http://x/y.png"}
    percents = progress_of(messages, polled)
    assert percents[0] == 0 and percents[-1] == 100 and any(0 < p < 100 for p in percents), percents

    forever = store.submit("rest-async", {"forever": True})
    cancel_when_running(client, store, messages, forever)
    wait_for(lambda: any(r[1].endswith("/cancel") for r in fakes["rest"].requests), message="the task cancelled")


def test_a_connector_raising_an_unexpected_exception_fails_only_its_job(client, store, messages, workers):
    pids = {i: p.pid for i, p in workers.procs.items()}
    boom = store.submit("boom", {"x": 1})
    echo = store.submit("echo", {"hello": "world"})
    assert finished(client, boom)["status"] == "failed"
    msg = one_failure(messages, boom)
    assert msg["error"] == "connector raised KeyError: 'a bug in a plugin'" and msg["can_retry"] is False
    assert finished(client, echo)["status"] == "completed"
    assert result_of(client, echo)["data"] == {"echo": {"hello": "world"}}
    again = store.submit("boom", {})  # the same worker keeps serving
    assert finished(client, again)["status"] == "failed"
    assert all(p.poll() is None for p in workers.procs.values())
    assert {i: p.pid for i, p in workers.procs.items()} == pids


def test_a_job_handed_back_by_a_drain_is_no_error_trace(redis_server, tmp_path):
    """A drain's hand-back is not the job's failure (it goes back uncounted): its trace was exported as an
    error trace (the CancelledError escaping job.execution), and an unsampled one was tail-kept as failed."""
    import signal
    import uuid

    from otlp_receiver import OtlpReceiver, attributes

    receiver = OtlpReceiver().start()
    body = textwrap.dedent(f"""
    telemetry:
      otlp_endpoint: {receiver.endpoint}
      export: {{interval: 0.1s}}
    workers:
      drained:
        connector: simulation
        job_types: [drainsim]
        concurrency: 2
        stop_grace: 2s
    """)
    procs = WorkerProcs(body, tmp_path / "w", redis_server.url, machine_id="drainotel")
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(client)
    jobs = {flags: f"drain-{flags}-{uuid.uuid4().hex[:8]}" for flags in ("01", "00")}  # sampled, unsampled
    try:
        procs.start()
        procs.wait_up(client, timeout=40)
        for flags, job_id in jobs.items():
            client.hset(f"job:{job_id}", "traceparent", f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-{flags}")
            store.submit("drainsim", {"steps": 0, "hang": True}, job_id=job_id, max_retries=3)
        wait_for(lambda: all(client.hget(f"job:{j}", "status") == "in_progress" for j in jobs.values()), 20,
                 message=f"both jobs running\n{procs.log(0)[-3000:]}")
        procs.signal(0, signal.SIGTERM)
        assert procs.wait_exit(0, 30) == 0, procs.log(0)[-3000:]
        assert {client.hget(f"job:{j}", "status") for j in jobs.values()} == {"pending"}  # handed back

        def roots():
            return {attributes(s.attributes).get("job.id"): s for s in receiver.spans() if s.name == "job.execution"}

        wait_for(lambda: jobs["01"] in roots(), 20, message="the sampled job's trace at the collector")
    finally:
        client.close()
        procs.close()
        receiver.stop()
    sampled = roots()[jobs["01"]]
    assert sampled.status.code == 1 and attributes(sampled.attributes)["job.handed_back"] is True
    assert jobs["00"] not in roots()  # unsampled and not failed: sampled out, as a job that ended well


def test_a_job_cancelled_while_its_outputs_download_leaves_no_files(redis_server, tmp_path):
    """ComfyUI's outputs are fetched after the prompt ends; a cancel then left the file being downloaded cut
    short, and the ones already fetched, in the job's output folder until the retention (24 h) removed them."""
    import threading

    release = threading.Event()
    fake = FakeComfyUI(node_s=0.02)
    fake.temp_view_hold = release  # /view of the temp image: half, then the rest once released
    fake.start()
    procs = WorkerProcs(f"""
workers:
  comfy:
    connector: comfyui
    job_types: [cutshort]
    settings: {{base_url: "{fake.url}"}}
""", tmp_path / "w", redis_server.url, machine_id="cutshort")
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(client)
    try:
        procs.start()
        procs.wait_up(client, timeout=40)
        job_id = store.submit("cutshort", {"workflow": happy()})  # (not the module's comfy worker's type)
        folder = tmp_path / "w" / "outputs" / procs.ids[0] / job_id
        # The saved image is fetched whole, the temp one half: both files are in the job's folder.
        wait_for(lambda: folder.is_dir() and len(list(folder.iterdir())) == 2, 20, message="the download going")
        assert store.cancel(job_id, "user pressed stop")
        wait_for(lambda: not client.hexists(f"jobs:active:{procs.ids[0]}", job_id), 20, message="cancel seen")
        wait_for(lambda: not folder.exists(), message=f"the folder gone: {list(folder.glob('*'))}")
        assert client.hget(f"job:{job_id}", "status") == "failed" and not client.hexists("jobs:completed", job_id)
        follower = store.submit("cutshort", {"workflow": happy()})  # the worker goes on
        release.set()
        wait_for(lambda: client.hget(f"job:{follower}", "status") == "completed", 20, message="the next job")
    finally:
        release.set()
        client.close()
        procs.close()
        fake.close()


@pytest.mark.parametrize("how", ["the API's cancel", "its job timeout"])
def test_a_cancel_or_a_timeout_reaches_the_connectors_cancel(client, store, workers, tmp_path, how):
    # The service must hear of it (A1111's /interrupt, ComfyUI's): the run's task is cancelled after a grace
    # either way, so without cancel() the job ended here while the service went on using the GPU for it
    # (mutation audit M4: both calls could be dropped with every test passing).
    job_id = store.submit("mark-timeout" if how == "its job timeout" else "mark", {"folder": str(tmp_path)},
                          max_retries=0)  # a timed-out job retried would come back to the module's one worker
    wait_for(lambda: client.hget(f"job:{job_id}:progress", "progress") == "50", message="the job to run")
    if how == "the API's cancel":
        assert store.cancel(job_id, "user pressed stop")
    wait_for(lambda: (tmp_path / f"cancelled-{job_id}").exists(), timeout=10, message="connector.cancel(job)")
    wait_for(lambda: client.hget(f"job:{job_id}", "status") in ("failed", "pending"), message="the job to end")


def test_a_cancel_seen_only_by_the_heartbeat_stops_the_job_and_frees_its_slot(client, store, workers, tmp_path):
    # The API's cancel whose cancel_job message never reached the worker (its subscription intact, the message
    # lost): the heartbeat's script finds the job failed and says so; the job must stop and its slot serve the
    # next job (mutation audit M4: dropping the heartbeat's cancels left the slot held for good).
    job_id = store.submit("mark", {"folder": str(tmp_path)})
    wait_for(lambda: client.hget(f"job:{job_id}:progress", "progress") == "50", message="the job to run")
    client.hset(f"job:{job_id}", mapping={"status": "failed", "error": "Job cancelled by user"})  # no message
    wait_for(lambda: (tmp_path / f"cancelled-{job_id}").exists(), timeout=10, message="the heartbeat's cancel")
    follower = store.submit("mark", {"folder": str(tmp_path), "mode": "self_cancel"})
    assert finished(client, follower)["status"] == "failed"  # it ran: the slot was free


def test_a_connectors_own_cancellation_nobody_asked_for_fails_the_job_with_its_words(client, store, workers,
                                                                                     messages, tmp_path):
    # "cancelled by user" would be untrue, and leaving it claimed would hand it back and run it again and again.
    job_id = store.submit("mark", {"folder": str(tmp_path), "mode": "self_cancel"}, max_retries=3)
    job = finished(client, job_id)
    assert (job["status"], job["error"]) == ("failed", "interrupted: the service was interrupted by hand")
    assert one_failure(messages, job_id)["can_retry"] is False
