"""Metrics (Prometheus text and OTLP), events, the connector job-lifecycle logger, and drop reporting."""

from __future__ import annotations

import io
import json
import logging
import math
import re

from prometheus_client.parser import text_string_to_metric_families

from emp_machine.telemetry import TelemetryConfig, setup
from emp_machine.telemetry.metrics import (Meter, merge_snapshots, parse_snapshot, render_prometheus,
                                          write_snapshot)
from otlp_receiver import OtlpReceiver, attributes, wait_until


def test_instruments_and_prometheus_text():
    meter = Meter()
    jobs = meter.create_counter("jobs_processed_total", "1", "jobs")
    done = jobs.bind(type="sim", status="completed")
    for _ in range(3):
        done.add(1)
    jobs.add(2, {"status": "failed", "type": "sim"})
    jobs.add(-5, {"status": "failed", "type": "sim"})  # ignored: counters only go up
    duration = meter.create_histogram("job_duration_seconds", "s")
    for value in (0.003, 0.2, 0.2, 700):
        duration.record(value, {"type": "sim"})
    meter.create_gauge("workers_active").set(2, {"service": "comfyui"})
    families = {f.name: f for f in text_string_to_metric_families(meter.render_prometheus())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("jobs_processed_total", (("status", "completed"), ("type", "sim")))] == 3
    assert samples[("jobs_processed_total", (("status", "failed"), ("type", "sim")))] == 2
    assert samples[("job_duration_seconds_bucket", (("le", "0.005"), ("type", "sim")))] == 1
    assert samples[("job_duration_seconds_bucket", (("le", "0.25"), ("type", "sim")))] == 3
    assert samples[("job_duration_seconds_bucket", (("le", "+Inf"), ("type", "sim")))] == 4
    assert samples[("job_duration_seconds_count", (("type", "sim"),))] == 4
    assert samples[("workers_active", (("service", "comfyui"),))] == 2
    assert families["job_duration_seconds"].type == "histogram"


def test_monotonic_instruments_drop_negative_values_on_every_path():
    meter = Meter()
    jobs = meter.create_counter("jobs_processed_total")
    done = jobs.bind(type="sim", status="completed")
    done.add(5)
    done.add(-3)  # the bound fast path ignores it as `add` does: a counter only goes up
    done.add(float("nan"))
    jobs.add(-3, {"type": "sim", "status": "completed"})
    assert jobs.points() == [({"status": "completed", "type": "sim"}, 5)]
    assert not hasattr(done, "set")  # nothing can set a counter back
    level = meter.create_up_down_counter("queue_depth")
    depth = level.bind(queue="q")
    depth.add(5)
    depth.add(-3)  # an up-down counter does go down
    level.add(-1, {"queue": "q"})
    assert level.points() == [({"queue": "q"}, 1)]
    workers = meter.create_gauge("workers_active").bind(service="sim")
    workers.set(3)
    workers.set(0)  # a gauge's bound cell keeps set()
    assert meter.create_gauge("workers_active").points() == [({"service": "sim"}, 0)]
    duration = meter.create_histogram("job_duration_seconds")
    duration.record(0.2, {"type": "sim"})
    duration.record(-5.0, {"type": "sim"})
    bound = duration.bind(type="sim")
    bound.record(-1.0)
    bound.record(float("nan"))
    bound.record(0.0)
    ((attributes, (count, total, counts, _bounds)),) = duration.points()
    assert (count, total, sum(counts), counts[0]) == (2, 0.2, 2, 1)


# The parts of the Prometheus text format 0.0.4 that render_prometheus writes, checked strictly (the
# prometheus_client parser accepts more: a `\"` in HELP text, `:` or non-ASCII letters in a label name).
_METRIC = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
_NUMBER = r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_HELP_LINE = re.compile(rf"# HELP ({_METRIC}) (?:[^\\\n]|\\[\\n])*")
_TYPE_LINE = re.compile(rf"# TYPE ({_METRIC}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE_LINE = re.compile(rf"({_METRIC})(?:\{{((?:{_LABEL}={_LABEL_VALUE})(?:,{_LABEL}={_LABEL_VALUE})*)?\}})?"
                          rf" ({_NUMBER})(?: -?\d+)?")


def _strict_prometheus_problems(text: str) -> list[str]:
    problems: list[str] = []
    if not text.endswith("\n"):
        problems.append("the text does not end with a newline")
    types: dict[str, str] = {}
    series: set[tuple] = set()
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            help_match, type_match = _HELP_LINE.fullmatch(line), _TYPE_LINE.fullmatch(line)
            if line.startswith("# HELP ") and not help_match:
                problems.append(f"bad HELP line {line!r}")
            elif line.startswith("# TYPE "):
                if not type_match:
                    problems.append(f"bad TYPE line {line!r}")
                elif type_match[1] in types:
                    problems.append(f"second TYPE line for {type_match[1]!r}")
                else:
                    types[type_match[1]] = type_match[2]
            continue
        sample = _SAMPLE_LINE.fullmatch(line)
        if not sample:
            problems.append(f"bad sample line {line!r}")
            continue
        name, labels = sample[1], sample[2] or ""
        names = re.findall(rf"({_LABEL})={_LABEL_VALUE}", labels)
        if len(names) != len(set(names)):
            problems.append(f"duplicate label name in {line!r}")
        problems += [f"reserved label name {n!r} in {line!r}" for n in names if n.startswith("__")]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        if types.get(family) == "histogram":
            if name.endswith("_bucket") != ("le" in names):
                problems.append(f"histogram sample {line!r}: le on a bucket, and only there")
        elif name not in types:
            problems.append(f"sample {line!r} before its TYPE line")
        if (name, labels) in series:
            problems.append(f"second sample of a series: {line!r}")
        series.add((name, labels))
    return problems


def test_prometheus_text_is_strict_0_0_4_whatever_the_names_and_values():
    meter = Meter()
    jobs = meter.create_counter("jobs_processed_total", "1", 'jobs finished, by "type" and status\\n\nsee C:\\docs')
    for job_type in ['a"b', "c\\d", "e\nf", "g\rh", "caf\u00e9", "tab\there"]:  # the producer's strings
        jobs.add(1, {"type": job_type, "status": "completed"})
    gauge = meter.create_gauge("workers_active")
    gauge.set(True, {"service": "comfyui"})
    gauge.set(2, {"service.name": "x", "service_name": "y"})  # two keys making one label name
    gauge.set(3, {"service.name": "z"})
    gauge.set(1, {"http:method": "GET"})  # ':' is for metric names, not label names
    gauge.set(1, {"2xx": "n"})
    gauge.set(1, {"caf\u00e9": "n"})
    gauge.set(1, {"__name__": "reserved"})
    gauge.set("not a number", {"service": "broken"})
    meter.create_gauge("temp\u00e9rature").set(False)
    meter.create_gauge("5xx_errors").set(1)
    duration = meter.create_histogram("job.duration", "s", explicit_bucket_boundaries_advisory=[0.1, 1.0])
    duration.record(0.5, {"le": "attribute", "type": "sim"})
    text = render_prometheus(merge_snapshots(meter.snapshot(), [("m1-worker-0", meter.snapshot())]))
    assert _strict_prometheus_problems(text) == []
    assert _strict_prometheus_problems(meter.render_prometheus()) == []
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["jobs_processed"].documentation == 'jobs finished, by "type" and status\\n\nsee C:\\docs'
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert {s.labels["type"] for s in families["jobs_processed"].samples} == {
        'a"b', "c\\d", "e\nf", "g\rh", "caf\u00e9", "tab\there"}  # label values keep every character
    assert samples[("workers_active", (("service", "comfyui"),))] == 1  # True
    assert samples[("workers_active", (("service_name", "y"),))] == 2  # the key that is the label name wins
    assert samples[("workers_active", (("service_name", "z"),))] == 3
    assert samples[("workers_active", (("http_method", "GET"),))] == 1
    assert samples[("workers_active", (("_2xx", "n"),))] == 1
    assert samples[("workers_active", (("caf_", "n"),))] == 1
    assert samples[("workers_active", (("_name__", "reserved"),))] == 1
    assert ("workers_active", (("service", "broken"),)) not in samples  # not a number: left out
    assert samples[("temp_rature", ())] == 0  # False
    assert samples[("_5xx_errors", (("worker_id", "m1-worker-0"),))] == 1
    assert samples[("job_duration_bucket", (("le", "1.0"), ("type", "sim")))] == 1
    assert samples[("job_duration_count", (("type", "sim"),))] == 1


def test_connector_logger_events_metrics_and_otlp(tmp_path):
    receiver = OtlpReceiver().start()
    stream = io.StringIO()
    config = TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": "0.1s"})
    telemetry = setup(config, machine_id="m1", worker_id="m1-worker-1", service_type="openai",
                      buffer_path=tmp_path / "t.db", stream=stream)
    try:
        log = telemetry.connector_logger("openai-0", "openai")
        log.received("job-1", model="gpt-4o", api_key="sk-abcdefghijklmnop")
        log.started("job-1")
        log.completed("job-1", 1500, usage={"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                      request_id="req-x")
        log.failed("job-2", TimeoutError("upstream timed out"), duration_ms=100, can_retry=True)
        log.health_check(False, status_code=503)
        a1111 = telemetry.connector_logger("a1111-0", "a1111")
        a1111.started("job-3", sampler="Euler a", steps=20, size=(512, 768))
        telemetry.events.emit("machine.started", boot_ms=1234)
        # a step line of the machine's (runtime/machine.py step()): a record through logging, named by its fields
        steps = logging.getLogger("test.machine_steps")
        steps.addHandler(telemetry.log_handler)
        steps.setLevel(logging.INFO)
        steps.propagate = False
        try:
            steps.info("boot.start", extra={"fields": {
                "event.name": "machine.boot.start", "event_type": "machine.boot.start", "processes": 2}})
        finally:
            steps.removeHandler(telemetry.log_handler)
        prom = telemetry.render_prometheus()
    finally:
        telemetry.shutdown()
        receiver.stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_event = {line["event_type"]: line for line in lines}
    assert by_event["job.received"]["api_key"] == "[REDACTED]" and by_event["job.received"]["model"] == "gpt-4o"
    completed = by_event["job.completed"]
    assert (completed["prompt_tokens"], completed["total_tokens"], completed["connector_id"]) == (10, 30, "openai-0")
    failed = by_event["job.failed"]
    assert failed["level"] == "error" and failed["error.type"] == "TimeoutError" and failed["can_retry"] is True
    assert by_event["service.health_check"]["level"] == "warning"
    started = by_event["job.started"]  # the last one: a1111's
    assert (started["sampler"], started["steps"], started["width"], started["height"]) == ("Euler a", 20, 512, 768)
    assert by_event["machine.started"]["boot_ms"] == 1234
    assert 'jobs_processed_total{status="failed",type="openai"} 1' in prom
    assert 'worker_errors_total{kind="job_failed",worker_id="m1-worker-1"} 1' in prom
    events = {r.event_name for r in receiver.logs()}
    assert {"job.received", "job.completed", "job.failed", "machine.started", "machine.boot.start"} <= events
    assert by_event["machine.boot.start"]["event.name"] == "machine.boot.start"  # the JSON line as before
    names = {m.name for m in receiver.metrics()}
    assert {"jobs_processed_total", "job_duration_seconds", "telemetry_sampling_rate"} <= names
    assert all("sk-abcdefghijklmnop" not in str(r) for r in receiver.logs())


def test_drops_are_reported_as_events_and_metrics(tmp_path):
    stream = io.StringIO()
    config = TelemetryConfig(buffer={"max_size": 30_000, "segment_size": 20_000})
    telemetry = setup(config, machine_id="m1", service_type="machine", buffer_path=tmp_path / "t.db",
                      stream=stream, system_metrics=True)
    try:
        log = telemetry.logger("test.drops")
        for i in range(3000):
            log.info("noise %d %s", i, "x" * (i % 97))
        telemetry.buffer.flush()
        assert wait_until(lambda: "telemetry.records_dropped" in stream.getvalue(), timeout=5)
        prom = telemetry.render_prometheus()
    finally:
        telemetry.shutdown()
    drop_lines = [json.loads(line) for line in stream.getvalue().splitlines() if "records_dropped" in line]
    assert drop_lines[0]["reason"] == "buffer_full" and drop_lines[0]["count"] > 0
    assert 'telemetry_records_dropped_total{reason="buffer_full"}' in prom
    assert "machine_memory_usage_bytes" in prom and "machine_uptime_seconds" in prom
    assert "machine_gpu_usage_percent" not in prom or "gpu=" in prom


def test_receiver_resource_has_the_documented_attributes(tmp_path):
    receiver = OtlpReceiver().start()
    config = TelemetryConfig(otlp_endpoint=receiver.endpoint, service_version="1.2.3", environment="prod",
                             export={"interval": "0.1s"})
    telemetry = setup(config, machine_id="gpu-m1", worker_id="gpu-m1-worker-0", service_type="comfyui",
                      region="eu-west", buffer_path=tmp_path / "t.db", stream=io.StringIO())
    with telemetry.tracer.start_as_current_span("x"):
        pass
    telemetry.shutdown()
    receiver.stop()
    resource = receiver.resources()[0]
    assert resource == {**resource, "service.name": "emp-machine", "service.version": "1.2.3",
                        "service.instance.id": "gpu-m1-worker-0", "deployment.environment": "prod",
                        "machine.id": "gpu-m1", "worker.id": "gpu-m1-worker-0", "service.type": "comfyui",
                        "cloud.region": "eu-west"}
    assert attributes(receiver.spans()[0].attributes)["service.type"] == "comfyui"


def test_other_libraries_log_through_the_root_handler(tmp_path):
    import logging

    stream = io.StringIO()
    telemetry = setup(TelemetryConfig(log_level="WARNING"), machine_id="m1", service_type="machine",
                      buffer_path=tmp_path / "t.db", stream=stream)
    try:
        telemetry.install_logging()
        library = logging.getLogger("some.library")
        library.info("below the level")
        library.warning("disk at %d%% with password=%s", 91, "hunter22")
        telemetry.events.emit("job.progress", level=logging.INFO)  # below the level too
    finally:
        telemetry.shutdown()
    assert logging.getLogger().handlers.count(telemetry.log_handler) == 0  # removed at shutdown
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["message"] == "disk at 91% with password=[REDACTED]"
    assert (line["logger"], line["level"], line["machine_id"]) == ("some.library", "warning", "m1")


def _family_names(text: str) -> dict[str, str]:
    """Every name a family writes (from its TYPE line: a histogram x writes x_bucket, x_sum and x_count) ->
    that family; a name claimed by two families is an AssertionError."""
    owner: dict[str, str] = {}
    for family, kind in re.findall(rf"^# TYPE ({_METRIC}) (\w+)$", text, re.M):
        names = [family] + ([family + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [])
        for name in names:
            assert name not in owner, f"{name} is written by both {owner[name]} and {family}"
            owner[name] = family
    return owner


def test_a_histogram_s_series_names_are_its_own_on_metrics(caplog):
    """A histogram x writes x_bucket, x_sum and x_count: a counter or gauge exposed as one of those, another
    histogram named so, or a family exposed as x, would be a second family writing the same series. The first
    registered keeps the names; a later one is left out, with a comment line and one warning."""
    meter = Meter()
    latency = meter.create_histogram("rpc.latency", "s", explicit_bucket_boundaries_advisory=[1.0])
    latency.record(0.5, {"route": "a"})
    meter.create_counter("rpc_latency_count").add(7, {"route": "a"})
    meter.create_gauge("rpc_latency_sum").set(3, {"route": "a"})
    meter.create_gauge("rpc.latency.bucket").set(4, {"le": "1.0", "route": "a"})  # x_bucket{le="1.0",...} again
    meter.create_histogram("rpc_latency_bucket", explicit_bucket_boundaries_advisory=[1.0]).record(0.1)
    meter.create_gauge("rpc_latency").set(1)
    meter.create_counter("queue_wait_sum").add(2)  # registered before the histogram: the counter keeps the name
    meter.create_histogram("queue_wait", explicit_bucket_boundaries_advisory=[1.0]).record(0.2)
    worker = Meter()
    worker.create_counter("rpc_latency_count").add(5)  # a worker's counter meets the machine's histogram
    worker.create_counter("worker_side_total").add(1)
    with caplog.at_level(logging.WARNING, logger="emp_machine.telemetry.metrics"):
        text = render_prometheus(merge_snapshots(meter.snapshot(), [("m1-worker-0", worker.snapshot())]))
        again = render_prometheus(merge_snapshots(meter.snapshot(), [("m1-worker-0", worker.snapshot())]))
    assert again == text and _strict_prometheus_problems(text) == []
    owner = _family_names(text)
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(set(families)) == len(families)  # each family once
    lines = [_SAMPLE_LINE.fullmatch(line) for line in text.splitlines() if line and not line.startswith("#")]
    series = [(m[1], m[2] or "") for m in lines]
    assert len(series) == len(set(series))  # no series twice
    assert all(name in owner for name, _ in series)  # every sample is one of its family's names
    samples = {(m[1], m[2] or ""): float(m[3]) for m in lines}
    assert samples[("rpc_latency_count", 'route="a"')] == 1  # the histogram's count, not the counter's 7
    assert samples[("rpc_latency_sum", 'route="a"')] == 0.5
    assert samples[("rpc_latency_bucket", 'route="a",le="1.0"')] == 1
    assert samples[("queue_wait_sum", "")] == 2 and "queue_wait_bucket" not in owner
    assert samples[("worker_side_total", 'worker_id="m1-worker-0"')] == 1
    assert "# counter rpc_latency_count left out: histogram rpc_latency writes rpc_latency_count already" in text
    assert "# histogram queue_wait left out: counter queue_wait_sum writes queue_wait_sum already" in text
    for left_out in ("counter rpc_latency_count", "gauge rpc_latency_sum", "gauge rpc_latency_bucket",
                     "histogram rpc_latency_bucket", "gauge rpc_latency", "histogram queue_wait"):
        warned = [r for r in caplog.records if r.getMessage().startswith(f"/metrics: {left_out} is left out")]
        assert len(warned) == 1, left_out  # once, not per scrape


def test_a_worker_value_that_is_not_a_number_loses_its_point_not_the_worker(tmp_path):
    """A worker's snapshot is parsed strictly; a gauge set to True, None or text once made the whole file
    "corrupt", and every series of that worker vanished from /metrics."""
    worker = Meter()
    worker.create_counter("snapshot_jobs_total").add(3)
    ready = worker.create_gauge("snapshot_ready")
    ready.set(True, {"service": "a"})
    ready.set(None, {"service": "b"})
    ready.set("busy", {"service": "c"})
    worker.create_gauge("snapshot_state").set("starting")  # no point left: no family either
    path = tmp_path / "m1-worker-0.json"
    write_snapshot(path, worker.snapshot(), worker_id="m1-worker-0", start_ns=1)
    worker_id, snapshot = parse_snapshot(path.read_bytes())
    assert [family[0] for family in snapshot] == ["snapshot_jobs_total", "snapshot_ready"]
    text = render_prometheus(merge_snapshots([], [(worker_id, snapshot)]))
    assert _strict_prometheus_problems(text) == []
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {("snapshot_jobs_total", (("worker_id", "m1-worker-0"),)): 3,
                       ("snapshot_ready", (("service", "a"), ("worker_id", "m1-worker-0"))): 1}


def test_an_int_past_a_float64_is_written_as_an_infinity_of_its_sign():
    # A scraper's ParseFloat refuses the digits of an int past a float64: /metrics writes +Inf or -Inf by its
    # sign, as OTLP does (its as_double).
    text = render_prometheus([("huge_up", "", "", "gauge", False, [({}, 10**400)]),
                              ("huge_down", "", "", "gauge", False, [({}, -10**400)]),
                              ("plain", "", "", "gauge", False, [({}, 10**20)])])
    samples = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples == {"huge_up": "+Inf", "huge_down": "-Inf", "plain": str(10**20)}
    from emp_machine.telemetry.metrics import as_float  # the OTLP encoder's as_double takes it from here

    assert (as_float(10**400), as_float(-10**400), as_float(10**20)) == (math.inf, -math.inf, 1e20)
