"""Connectors' telemetry through real worker processes, against the fake services over real HTTP: the
requests a service receives carry the context of the worker's `service.call` span (the producer's
tracestate kept, ours added, x-job-id, x-request-id); each connector's lifecycle records are events whose
service fields are record attributes; a failed job counts worker_errors_total once; the worker's RSS is
recorded. What the workers recorded is read back from their durable buffers after a graceful stop."""

from __future__ import annotations

import json
import signal
import textwrap
from dataclasses import dataclass, field

import pytest
import redis as redis_lib
from fakes.comfyui import FakeComfyUI
from fakes.openai import FakeOpenAI
from test_connector_comfyui import happy

from emp_machine.runtime.jobs import JobStore
from emp_machine.telemetry.buffer import Buffer, Kind
from harness import WorkerProcs, wait_for

KEY = "sk-test-3b1d9f7a5c2e4b6d8f0a1c3e5b7d9f1a"
MACHINE = "tel"
PRODUCER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_SPAN = "00f067aa0ba902b7"
PRODUCER_STATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@dataclass
class Recorded:
    """What one worker left in its buffer: spans, log records and the last metric point."""

    spans: list = field(default_factory=list)
    logs: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # name -> [(attributes, value)]

    def events(self, name: str, job_id: str) -> list[dict]:
        return [r[4] for r in self.logs if r[7] == name and r[4].get("job_id") == job_id]


def read_buffer(path) -> Recorded:
    buffer = Buffer(path)
    try:
        def records(kind):
            return [r for chunk in buffer.read(kind, 10**7) for r in chunk.records[chunk.sent:]]
        out = Recorded(spans=records(Kind.SPAN), logs=records(Kind.LOG))
        points = records(Kind.METRIC)
        if points:
            out.metrics = {row[0]: row[5] for row in max(points, key=lambda p: p[0])[2]}
        return out
    finally:
        buffer.close()


def traced_submit(client, store, service, payload, job_id, **options):
    """A job whose producer's context is in its hash (the EMP API writes traceparent/tracestate the same way):
    written before the submit script's HSET, which keeps fields it does not set."""
    client.hset(f"job:{job_id}", mapping={"traceparent": f"00-{PRODUCER_TRACE}-{PRODUCER_SPAN}-01",
                                          "tracestate": PRODUCER_STATE})
    return store.submit(service, payload, job_id=job_id, **options)


@pytest.fixture(scope="module")
def scenario(redis_server, tmp_path_factory):
    client = redis_lib.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    comfy, openai = FakeComfyUI(node_s=0.02).start(), FakeOpenAI(KEY).start()
    state = tmp_path_factory.mktemp("ct")
    body = textwrap.dedent(f"""
    telemetry:
      log_level: DEBUG
    workers:
      comfy:
        connector: comfyui
        settings: {{base_url: "{comfy.url}"}}
      openai:
        connector: openai
        settings: {{base_url: "{openai.url}", api_key_env: EMP_TEST_OPENAI_KEY, max_retries: 0}}
        env: {{EMP_TEST_OPENAI_KEY: "{KEY}"}}
      sim:
        connector: simulation
    """)
    procs = WorkerProcs(body, state, redis_server.url, machine_id=MACHINE)
    try:
        procs.start()
        procs.wait_up(client, timeout=40)
        store = JobStore(client)
        jobs = {
            "comfy": traced_submit(client, store, "comfyui", {"workflow": happy()}, "job-comfy-1"),
            "openai": traced_submit(client, store, "openai", {"model": "gpt-4o-mini",
                                                             "messages": [{"role": "user", "content": "hi"}]},
                                    "job-openai-1"),
            "sim_ok": store.submit("simulation", {"steps": 2, "step_ms": 1}),
            "sim_bad1": store.submit("simulation", {"steps": 3, "step_ms": 1, "fail_at_step": 2,
                                                    "fail_retryable": False}, max_retries=0),
            "sim_bad2": store.submit("simulation", {"steps": 3, "step_ms": 1, "fail_at_step": 2,
                                                    "fail_retryable": False}, max_retries=0),
        }
        for job_id in jobs.values():
            wait_for(lambda: client.hget(f"job:{job_id}", "status") in ("completed", "failed"), 20,
                     message=f"job {job_id} to end")
        # One more, cancelled by the API while it runs (its steps done, it hangs until then).
        jobs["sim_cancelled"] = cancelled = store.submit("simulation", {"steps": 1, "step_ms": 0, "hang": True})
        wait_for(lambda: client.hget(f"job:{cancelled}:progress", "progress") == "100", 20, message="steps done")
        assert store.cancel(cancelled, "user pressed stop")
        wait_for(lambda: not client.hexists(f"jobs:active:{procs.ids[2]}", cancelled), message="cancel seen")
        outcome = {name: client.hget(f"job:{job_id}", "status") for name, job_id in jobs.items()}
        results = {name: json.loads(client.hget("jobs:completed", job_id) or '{"data": null}')["data"]
                   for name, job_id in jobs.items()}
        for i in procs.procs:  # a graceful stop flushes each worker's telemetry into its buffer
            procs.signal(i, signal.SIGTERM)
        for i in procs.procs:
            assert procs.wait_exit(i) == 0
        recorded = {group: read_buffer(state / "telemetry" / f"{MACHINE}-worker-{i}.db")
                    for i, group in enumerate(("comfy", "openai", "sim"))}
        assert {w: r.spans != [] for w, r in recorded.items()} == {"comfy": True, "openai": True, "sim": True}
        yield {"jobs": jobs, "outcome": outcome, "results": results, "recorded": recorded,
               "comfy": comfy, "openai": openai, "ids": procs.ids}
    finally:
        procs.close()
        comfy.close()
        openai.close()
        client.close()


def service_call_span(recorded: Recorded, job_id: str):
    [execution] = [s for s in recorded.spans if s[3] == "job.execution" and s[7].get("job.id") == job_id]
    [call] = [s for s in recorded.spans if s[3] == "service.call" and s[2] == execution[1]]
    return execution, call


def test_comfyui_requests_carry_the_service_call_spans_context(scenario):
    job_id = scenario["jobs"]["comfy"]
    assert scenario["outcome"]["comfy"] == "completed"
    execution, call = service_call_span(scenario["recorded"]["comfy"], job_id)
    assert f"{execution[0]:032x}" == PRODUCER_TRACE and f"{execution[2]:016x}" == PRODUCER_SPAN
    requests = [r for r in scenario["comfy"].requests if r[2].get("x-job-id") == job_id]
    paths = [path.split("?")[0] for _, path, _ in requests]
    assert "/ws" in paths and "/prompt" in paths and "/view" in paths, paths
    worker = scenario["ids"][0]
    for _, path, headers in requests:  # the socket, the prompt, the history and every download
        assert headers["traceparent"] == f"00-{PRODUCER_TRACE}-{call[1]:016x}-01", path
        members = headers["tracestate"].split(",")
        assert members[0] == f"emp=machine:{MACHINE};worker:{worker}"
        assert members[1:] == PRODUCER_STATE.split(","), headers["tracestate"]
        assert headers["x-request-id"].startswith("req-")
    ids = [headers["x-request-id"] for _, _, headers in requests]
    assert len(set(ids)) == len(ids)  # one id per HTTP request, the job's trace headers shared
    # and each is findable from our side: the service.call span lists the ids it sent
    assert sorted(call[7]["request_ids"]) == sorted(ids)


def test_comfyui_lifecycle_records_are_events_with_prompt_id_attributes(scenario):
    job_id = scenario["jobs"]["comfy"]
    recorded = scenario["recorded"]["comfy"]
    meta = scenario["results"]["comfy"]["service_metadata"]
    _, call = service_call_span(recorded, job_id)
    for name in ("job.received", "job.started", "job.completed"):
        [record] = [r for r in recorded.events(name, job_id) if r.get("connector_id") == "comfyui-0"]
        assert (record["prompt_id"], record["client_id"]) == (meta["prompt_id"], meta["client_id"]), name
        assert record["span_id"] == f"{call[1]:016x}" and record["trace_id"] == PRODUCER_TRACE
    progress = recorded.events("job.progress", job_id)
    assert {"1", "2", "3", "4", "5"} <= {r["node"] for r in progress}
    assert all(r["prompt_id"] == meta["prompt_id"] for r in progress)


def test_openai_records_carry_model_request_id_and_token_usage(scenario):
    job_id = scenario["jobs"]["openai"]
    assert scenario["outcome"]["openai"] == "completed"
    meta = scenario["results"]["openai"]["service_metadata"]
    [completed] = [r for r in scenario["recorded"]["openai"].events("job.completed", job_id)
                   if r.get("connector_id") == "openai-1"]
    assert (completed["model"], completed["request_id"]) == ("gpt-4o-mini", meta["request_id"])
    usage = meta["usage"]
    assert (completed["prompt_tokens"], completed["completion_tokens"], completed["total_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    [(_, headers, _)] = [r for r in scenario["openai"].requests if r[1].get("x-job-id") == job_id]
    _, call = service_call_span(scenario["recorded"]["openai"], job_id)
    assert headers["traceparent"].split("-")[2] == f"{call[1]:016x}"
    assert headers["tracestate"].split(",")[1:] == PRODUCER_STATE.split(",")
    assert KEY not in json.dumps(scenario["recorded"]["openai"].logs)


def test_a_failed_job_counts_worker_errors_total_once(scenario):
    assert [scenario["outcome"][k] for k in ("sim_ok", "sim_bad1", "sim_bad2")] == ["completed", "failed", "failed"]
    recorded = scenario["recorded"]["sim"]
    worker = scenario["ids"][2]
    errors = {tuple(sorted(a.items())): v for a, v in recorded.metrics["worker_errors_total"]}
    assert errors == {(("kind", "job_failed"), ("worker_id", worker)): 2}
    processed = {tuple(sorted(a.items())): v for a, v in recorded.metrics["jobs_processed_total"]}
    assert processed[(("status", "failed"), ("type", "simulation"))] == 2  # counted once, by the worker
    assert processed[(("status", "completed"), ("type", "simulation"))] == 1
    [failed] = [r for r in recorded.events("job.failed", scenario["jobs"]["sim_bad1"]) if "connector_id" in r]
    assert (failed["steps"], failed["error.type"], failed["can_retry"]) == (3, "FatalJobError", False)
    [received] = [r for r in recorded.events("job.received", scenario["jobs"]["sim_ok"])]
    assert received["steps"] == 2 and received["connector_id"] == "simulation-2"


def test_a_cancelled_job_is_counted_and_marked_on_its_span(scenario):
    """jobs_processed_total{status="cancelled"} (it was counted nowhere) and `job.cancelled` on the job's span,
    whose status is OK: a cancel is the user's, not an error (unset, the call it ended made it a failed job's
    trace, kept whatever the sampling)."""
    recorded = scenario["recorded"]["sim"]
    job_id = scenario["jobs"]["sim_cancelled"]
    assert scenario["outcome"]["sim_cancelled"] == "failed"
    processed = {tuple(sorted(a.items())): v for a, v in recorded.metrics["jobs_processed_total"]}
    assert processed[(("status", "cancelled"), ("type", "simulation"))] == 1
    assert processed[(("status", "completed"), ("type", "simulation"))] == 1  # not counted as completed
    [execution] = [s for s in recorded.spans if s[3] == "job.execution" and s[7].get("job.id") == job_id]
    assert execution[7].get("job.cancelled") is True and execution[8] == 1, execution


def test_worker_memory_usage_bytes_is_the_workers_rss(scenario):
    for i, recorded in enumerate(scenario["recorded"].values()):
        [(attributes, rss)] = recorded.metrics["worker_memory_usage_bytes"]
        assert attributes == {"worker_id": scenario["ids"][i]} and 20 * 2**20 < rss < 2**32
