"""The worker's guard against inline blobs in results (emp_machine/runtime/outputs.py)."""

from __future__ import annotations

import base64
import json

from emp_machine.connectors.base import JobResult, OutputFile
from emp_machine.runtime import outputs

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 80  # ~20 KB


def test_small_results_are_left_alone_and_cost_no_file(tmp_path):
    result = JobResult(data={"sum": 6, "url": "http://x/y.png", "note": "x" * 1000}, service_metadata={"a": 1})
    assert outputs.spill(result, tmp_path / "job") is result
    assert not (tmp_path / "job").exists()


def test_data_uris_base64_and_huge_text_become_referenced_files(tmp_path):
    prior = OutputFile("/already/there.png", "image/png", 3)
    b64 = base64.b64encode(PNG).decode()
    huge = "line of log\n" * (outputs.TEXT_MIN // 10)
    result = JobResult(data={"images": ["data:image/webp;base64," + b64, b64], "log": huge, "n": 1},
                       outputs=[prior], service_metadata={"raw": "data:image/png;base64," + b64})
    spilled = outputs.spill(result, tmp_path / "job-1")
    first, second = spilled.data["images"]
    assert first["mime_type"] == "image/webp" and second["mime_type"] == "image/png"  # named, then sniffed
    for ref in (first, second, spilled.service_metadata["raw"]):
        assert open(ref["path"], "rb").read() == PNG and ref["size_bytes"] == len(PNG)
    assert spilled.data["log"]["mime_type"] == "text/plain"
    assert open(spilled.data["log"]["path"]).read() == huge and spilled.data["n"] == 1
    assert spilled.outputs[0] == prior and len(spilled.outputs) == 5  # every file listed once
    assert len({o.path for o in spilled.outputs}) == 5
    document = json.dumps(spilled.to_json())
    assert b64[:100] not in document and len(document) < 5000


def test_a_blob_that_is_not_valid_base64_is_kept_as_text_not_lost(tmp_path):
    broken = "data:image/png;base64," + "A" * 2000 + "!!"
    spilled = outputs.spill(JobResult(data=broken), tmp_path)
    assert spilled.data["mime_type"] == "text/plain" and open(spilled.data["path"]).read() == broken
