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


def test_text_in_base64s_alphabet_is_never_decoded_into_garbage(tmp_path):
    # 520 sha256 hex digests (33,280 characters, a multiple of 4) matched the base64 pattern and were stored as
    # their "decoding": the text was lost. So were other alphanumeric texts, and a list of UUIDs matched
    # URL-safe base64's alphabet.
    import hashlib
    import uuid

    digests = "".join(hashlib.sha256(str(i).encode()).hexdigest() for i in range(520))
    uuids = "\n".join(str(uuid.UUID(int=i * 7919)) for i in range(600))
    big_hex = digests * 9  # past TEXT_MIN: stored, as the text it is
    assert len(digests) % 4 == 0 and len(big_hex) >= outputs.TEXT_MIN
    spilled = outputs.spill(JobResult(data={"digests": digests, "ids": uuids, "big": big_hex}), tmp_path)
    assert spilled.data["digests"] == digests and spilled.data["ids"] == uuids
    assert spilled.data["big"]["mime_type"] == "text/plain" and open(spilled.data["big"]["path"]).read() == big_hex


def test_url_safe_base64_of_a_file_is_stored_as_that_file(tmp_path):
    # A service's base64url image (`-`, `_`, no padding) stayed inline, 133 KB of it in jobs:completed and on
    # complete_job; the same image in standard base64 was stored.
    encoded = base64.urlsafe_b64encode(PNG).decode().rstrip("=")
    assert "-" in encoded or "_" in encoded
    spilled = outputs.spill(JobResult(data={"image": encoded}), tmp_path)
    ref = spilled.data["image"]
    assert ref["mime_type"] == "image/png" and open(ref["path"], "rb").read() == PNG
    for head in (b"BM", b"II*\x00", b"glTF", b"\xff\xf1", b"\xff\xf2"):  # BMP, TIFF, glTF, AAC, MPEG-2 audio
        blob = head + bytes(range(256)) * 80
        spilled = outputs.spill(JobResult(data=base64.urlsafe_b64encode(blob).decode().rstrip("=")), tmp_path)
        assert open(spilled.data["path"], "rb").read() == blob, head
