"""Service output tailing: parsing and folding, and offsets that survive rotation and restarts."""

from __future__ import annotations

import os
from pathlib import Path

from emp_machine.telemetry.buffer import Buffer, Kind
from emp_machine.telemetry.tailer import ServiceOutputTailer

TRACEBACK = """Traceback (most recent call last):
  File "/app/comfy/execution.py", line 10, in execute
    output = node.run()
KeyError: 'model'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/app/comfy/execution.py", line 12, in execute
    raise RuntimeError("node failed")
RuntimeError: node failed with token=abcdef123456
"""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _bodies(buffer: Buffer) -> list[str]:
    buffer.flush()
    return [r[3] for c in buffer.read(Kind.LOG, 10**9) for r in c.records[c.sent:]]


def _records(buffer: Buffer) -> list[tuple]:
    buffer.flush()
    return [r for c in buffer.read(Kind.LOG, 10**9) for r in c.records[c.sent:]]


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_levels_tracebacks_progress_and_enrichment(tmp_path):
    log = tmp_path / "comfyui-0-stderr.log"
    _append(log, "Starting server\n2024-01-01 WARNING low VRAM\nERROR: could not load x\n")
    _append(log, TRACEBACK)
    _append(log, " 10%|█         | 2/20 [00:01<00:09,  1.9it/s]\r 50%|█████     | 10/20 [00:05<00:05,  2.0it/s]\r")
    _append(log, "Prompt executed in 5.2 seconds\n")
    buffer = Buffer(tmp_path / "b.db")
    try:
        tailer = ServiceOutputTailer(buffer, [(log, "comfyui-0", "comfyui", "m1-worker-0")], machine_id="m1")
        tailer.poll_once()
        records = _records(buffer)
    finally:
        buffer.close()
    by_body = {r[3].splitlines()[0]: r for r in records}
    assert by_body["Starting server"][2] == "INFO"
    assert by_body["2024-01-01 WARNING low VRAM"][2] == "WARNING"
    assert by_body["ERROR: could not load x"][2] == "ERROR"
    tb = by_body["Traceback (most recent call last):"]
    assert tb[2] == "ERROR" and tb[4]["error.type"] == "RuntimeError"
    assert tb[3].count("Traceback") == 2 and "KeyError: 'model'" in tb[3]  # the chain is one record
    assert "abcdef123456" not in tb[3] and "abcdef123456" not in tb[4]["error.message"]
    progress = [r for r in records if r[7] == "service.progress"]
    assert len(progress) == 1 and (progress[0][4]["progress"], progress[0][4]["step"]) == (50, 10)
    assert tb[4] | {"error.type": "", "error.message": ""} == {
        "machine_id": "m1", "worker_id": "m1-worker-0", "service_type": "comfyui", "process": "comfyui-0",
        "source": "stderr", "log.file.path": str(log), "error.type": "", "error.message": ""}
    assert len(records) == 6


def test_partial_lines_and_open_tracebacks_wait_then_flush_when_idle(tmp_path):
    log = tmp_path / "svc-stdout.log"
    clock = Clock()
    buffer = Buffer(tmp_path / "b.db")
    try:
        tailer = ServiceOutputTailer(buffer, [(log, "svc", "simulation")], machine_id="m1", fold_timeout=1.0,
                                     clock=clock)
        _append(log, "done\nTraceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\npart")
        tailer.poll_once()
        assert _bodies(buffer) == ["done"]  # the traceback may still be chained; "part" has no newline
        _append(log, "ial line\n")
        tailer.poll_once()
        assert _bodies(buffer)[1:] == ['Traceback (most recent call last):\n  File "x.py", line 1\nValueError: bad',
                                       "partial line"]
        _append(log, "Traceback (most recent call last):\nOSError: disk")
        tailer.poll_once()
        assert len(_bodies(buffer)) == 3
        clock.now += 1.5  # no growth for longer than fold_timeout: emit what there is
        tailer.poll_once()
        assert _bodies(buffer)[3] == "Traceback (most recent call last):\nOSError: disk"
    finally:
        buffer.close()


def test_rotation_and_restarts_lose_and_duplicate_nothing(tmp_path):
    log = tmp_path / "svc-stdout.log"
    lines = iter(f"line {i}" for i in range(10_000))
    written: list[str] = []

    def write(n: int, path: Path = log) -> None:
        chunk = [next(lines) for _ in range(n)]
        written.extend(chunk)
        _append(path, "".join(line + "\n" for line in chunk))

    buffer = Buffer(tmp_path / "b.db")
    tailer = ServiceOutputTailer(buffer, [(log, "svc", "simulation")], machine_id="m1")
    write(100)
    tailer.poll_once()
    write(50)
    os.rename(log, log.with_name(log.name + ".1"))  # supervisor rotates...
    write(20, log.with_name(log.name + ".1"))         # ...the service still had the old file open
    write(30)                                         # new file
    tailer.poll_once()
    write(40)
    tailer.poll_once()
    write(25)
    buffer.close()  # the machine dies here (the tailer is never stopped)

    # while it is down: more output, and another rotation
    os.replace(log, log.with_name(log.name + ".1"))
    write(15)
    buffer = Buffer(tmp_path / "b.db")
    try:
        tailer = ServiceOutputTailer(buffer, [(log, "svc", "simulation")], machine_id="m1")
        tailer.poll_once()
        tailer.poll_once()
        write(10)
        tailer.stop()
        assert _bodies(buffer) == written
    finally:
        buffer.close()


def test_a_restart_without_new_output_reads_nothing_again(tmp_path):
    log = tmp_path / "svc-stdout.log"
    _append(log, "a\nb\n")
    buffer = Buffer(tmp_path / "b.db")
    ServiceOutputTailer(buffer, [(log, "svc", "simulation")], machine_id="m1").stop()
    buffer.close()
    buffer = Buffer(tmp_path / "b.db")
    try:
        ServiceOutputTailer(buffer, [(log, "svc", "simulation")], machine_id="m1").stop()
        assert _bodies(buffer) == ["a", "b"]
    finally:
        buffer.close()


def test_telemetry_ships_tailed_output(tmp_path):
    import io

    from emp_machine.telemetry import TelemetryConfig, setup
    from otlp_receiver import OtlpReceiver, attributes

    receiver = OtlpReceiver().start()
    log = tmp_path / "comfyui-0-stdout.log"
    _append(log, "got prompt\n")
    telemetry = setup(TelemetryConfig(otlp_endpoint=receiver.endpoint, export={"interval": "0.1s"}),
                      machine_id="m1", service_type="machine", buffer_path=tmp_path / "t.db", stream=io.StringIO())
    try:
        telemetry.tail_service_output([(log, "comfyui-0", "comfyui", "m1-worker-0")], poll=0.02)
        assert receiver.wait_for(lambda r: any(x.body.string_value == "got prompt" for x in r.logs()), timeout=10)
    finally:
        telemetry.shutdown()
        receiver.stop()
    (record,) = [x for x in receiver.logs() if x.body.string_value == "got prompt"]
    assert attributes(record.attributes)["worker_id"] == "m1-worker-0"
