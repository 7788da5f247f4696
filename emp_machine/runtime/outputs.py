"""The worker's guard against inline blobs in a job's result.

The contract says results must not carry large inline blobs: outputs are files under the machine's output
directory, passed by reference. The built-in connectors store their images themselves; a connector that
passes a service's answer through (rest, a third party's) may still return a base64 image or a huge text.
Before a result is recorded, `spill` moves such values into files beside the connector's own outputs and
puts the reference in their place (the same shape as `JobResult.outputs` entries, which list them too):

- a `data:<mime>;base64,...` URI of at least DATA_URI_MIN characters: decoded, with the mime type it names;
- a string of at least BASE64_MIN characters that is base64: decoded, its type sniffed from its bytes. Only
  base64 that shows it is (a `+`, `/` or `=`, as base64 of any real file has), or URL-safe base64 (`-`, `_`)
  whose bytes start as a known file does: a long hex digest or an alphanumeric text has base64's alphabet,
  and was stored as its "decoding" (garbage; the text itself was lost), a list of UUIDs URL-safe base64's;
- any other string of at least TEXT_MIN characters: stored as text.

The scan is a walk over the result's data and metadata (cheap for the small results of most jobs); files
are written only when something is found.

A result can also be large without any large string (50 MB of short strings): written whole into
jobs:completed and published on complete_job, it got the API's subscriber disconnected by Redis (pub/sub
output buffer limit), losing other jobs' completions. `cap` stores a result whose JSON is over
RESULT_MAX_BYTES as a file: its `data` (and, if still over, its metadata) become a reference.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import mimetypes
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from emp_machine.connectors._http import safe_name, sniff_image_suffix, unique_path
from emp_machine.connectors.base import JobResult, OutputFile
from emp_machine.telemetry.redact import mask_values

DATA_URI_MIN = 1024
BASE64_MIN = 16 * 1024
TEXT_MIN = 256 * 1024
RESULT_MAX_BYTES = 1024 * 1024  # a result's JSON above this is stored as a file (see cap)
STORED_NOTE = "the result was larger than 1 MiB: it is stored as this JSON file"

_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}", re.ASCII)
_BASE64URL = re.compile(r"[A-Za-z0-9_\-\r\n]+={0,2}", re.ASCII)
_URL_TO_STANDARD = str.maketrans("-_", "+/", "\r\n")
# The first bytes of the files services send as base64: images (PNG, JPEG, GIF, WebP/WAV/AVI's RIFF, BMP, TIFF),
# audio (MP3 with an ID3 tag or a bare MPEG frame, AAC's ADTS, Ogg, FLAC), video (Matroska/WebM; MP4/MOV by
# their `ftyp` at byte 4), 3D (glTF binary), PDF, zip.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF87a", b"GIF89a", b"RIFF", b"BM", b"II*\x00", b"MM\x00*", b"ID3",
               b"\xff\xfb", b"\xff\xfa", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1", b"\xff\xf9", b"OggS", b"fLaC",
               b"\x1aE\xdf\xa3", b"glTF", b"%PDF", b"PK\x03\x04")


def _known_file(data: bytes | None) -> bool:
    return data is not None and (data.startswith(_SIGNATURES) or data[4:8] == b"ftyp")  # ftyp: MP4, MOV


def _kind(value: str) -> str | None:
    """'data-uri', 'base64', 'base64url', 'text' or None (kept inline)."""
    size = len(value)
    if size >= DATA_URI_MIN and value.startswith("data:") and _DATA_URI.match(value):
        return "data-uri"
    if size >= BASE64_MIN:
        if _BASE64.fullmatch(value):
            if "+" in value or "/" in value or value.endswith("="):
                return "base64"
        elif _BASE64URL.fullmatch(value) and _known_file(_Spiller._decode_url(value[:64])):
            return "base64url"
    if size >= TEXT_MIN:
        return "text"
    return None


def _has_blob(value: Any) -> bool:
    if type(value) is str:
        return _kind(value) is not None
    if isinstance(value, Mapping):
        return any(_has_blob(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_blob(v) for v in value)
    return False


def needs_spill(result: JobResult) -> bool:
    return _has_blob(result.data) or _has_blob(result.service_metadata)


class _Spiller:
    def __init__(self, directory: Path):
        self.directory = directory
        self.files: list[OutputFile] = []

    def walk(self, value: Any, name: str) -> Any:
        if type(value) is str:
            kind = _kind(value)
            return value if kind is None else self.store(value, kind, name).to_json()
        if isinstance(value, Mapping):
            return {k: self.walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(v, f"{name}-{i}") for i, v in enumerate(value)]
        return value

    def store(self, value: str, kind: str, name: str) -> OutputFile:
        mime, data = None, None
        if kind == "data-uri":
            header, _, payload = value.partition(",")
            mime = _DATA_URI.match(header + ",").group(1)
            data = self._decode(payload)
        elif kind == "base64":
            data = self._decode(value)
        elif kind == "base64url":
            data = self._decode_url(value)
        if data is None:  # not decodable after all: kept as the text it is
            mime, data, suffix = "text/plain", value.encode(), ".txt"
        else:
            suffix = (mimetypes.guess_extension(mime) if mime else None) or sniff_image_suffix(data)
            mime = mime or mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream"
        path = unique_path(self.directory, safe_name(name, "inline") + suffix)
        created = False
        try:
            with path.open("wb") as out:
                created = True
                out.write(data)
        except BaseException:
            if created:  # a write that failed half-way (disk full): no partial file left behind
                with contextlib.suppress(OSError):  # never hide the write's own error behind the clean-up's
                    path.unlink(missing_ok=True)
            raise
        output = OutputFile(str(path), mime, len(data))
        self.files.append(output)
        return output

    def discard(self) -> None:
        """Remove the files stored so far."""
        for output in self.files:
            with contextlib.suppress(OSError):
                Path(output.path).unlink(missing_ok=True)
        self.files.clear()

    @staticmethod
    def _decode(payload: str) -> bytes | None:
        try:
            return base64.b64decode(payload.replace("\n", "").replace("\r", ""), validate=True)
        except (binascii.Error, ValueError):
            return None

    @staticmethod
    def _decode_url(payload: str) -> bytes | None:
        """URL-safe base64, padded or not (as JWTs and many APIs send it)."""
        standard = payload.translate(_URL_TO_STANDARD).rstrip("=")
        return None if len(standard) % 4 == 1 else _Spiller._decode(standard + "=" * (-len(standard) % 4))


def spill(result: JobResult, directory: Path) -> JobResult:
    """`result` with its inline blobs moved to files under `directory` (blocking I/O: run it in a thread);
    the same object when there is none."""
    if not needs_spill(result):
        return result
    spiller = _Spiller(directory)
    try:
        data = spiller.walk(result.data, "data")
        metadata = spiller.walk(dict(result.service_metadata), "metadata")
    except BaseException:
        spiller.discard()  # a spill that failed part-way leaves none of its files: the job is not recorded
        raise
    return replace(result, data=data, service_metadata=metadata, outputs=[*result.outputs, *spiller.files])


def result_size(result: JobResult, limit: int | None = None) -> int:
    """The size in bytes of the result's JSON as it would be recorded (ASCII, as jobs.py writes it); 0 for a
    result JSON cannot hold (the finishing write reports that). With `limit`, counting stops once past it
    (a size over `limit` is then all it says), in Python's incremental encoder: the C one holds the GIL for the
    whole value, so even in a thread it stopped the worker's loop (a 26 MB result, 0.4 s a call)."""
    try:
        if limit is None:
            return len(json.dumps(result.to_json(), separators=(",", ":")))
        size = 0
        for chunk in _ENCODER.iterencode(result.to_json()):  # not one-shot: the Python encoder, chunk by chunk
            size += len(chunk)
            if size > limit:
                break
        return size
    except (TypeError, ValueError):
        return 0


_ENCODER = json.JSONEncoder(separators=(",", ":"))
SMALL_RESULT_CHARS = 256 * 1024  # a result with less text than this is checked on the worker's loop (is_small)


def is_small(result: JobResult, budget: int = SMALL_RESULT_CHARS) -> bool:
    """Whether the result holds less than `budget` characters of text and items (keys, strings, scalars): a
    walk that stops once past it. Such a result's checks (needs_spill, result_size, mask) cost little on the
    worker's loop; a larger one is prepared in a thread (`prepare`)."""
    left = budget
    stack: list[Any] = [result.data, result.service_metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, (str, bytes, bytearray)):
            left -= len(value) + 2
        elif isinstance(value, Mapping):
            left -= len(value)
            for key, item in value.items():
                if type(key) is str:
                    left -= len(key)
                stack.append(item)
        elif isinstance(value, (list, tuple)):
            left -= len(value)
            stack.extend(value)
        else:
            left -= 8
        if left < 0:
            return False
    return True


def mask(result: JobResult, secrets: tuple[str, ...]) -> JobResult:
    """`result` with `secrets` (the worker's secret values, of 8 characters or more: telemetry.redact's
    mask_values) replaced in its text, keys left alone: a connector that echoes its API key, or a service's
    answer quoting it, would publish the key to every reader of jobs:completed. The same object when none
    appears."""
    data = mask_values(result.data, secrets)
    metadata = mask_values(result.service_metadata, secrets)
    if data is result.data and metadata is result.service_metadata:
        return result
    return replace(result, data=data, service_metadata=metadata)


def prepare(result: JobResult, directory: Path, secrets: tuple[str, ...] = ()) -> JobResult:
    """`result` as it is recorded: the secrets masked, inline blobs spilled to files, and over RESULT_MAX_BYTES
    stored as a file (blocking I/O and walks of a large value: run it in a thread). Sized with the bounded
    incremental encoder, so the worker's loop (its heartbeat, cancels) runs between its steps."""
    result = spill(mask(result, secrets), directory)
    if result_size(result, RESULT_MAX_BYTES) > RESULT_MAX_BYTES:
        result = cap(result, directory)
    return result


def _stored(value: Any, path: Path) -> dict[str, Any]:
    """Write `value` as JSON to `path` (no partial file left on failure); its reference."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("w", encoding="utf-8") as out:
            json.dump(value, out, ensure_ascii=False)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise
    return {"path": str(path), "mime_type": "application/json", "size_bytes": path.stat().st_size,
            "stored_as_file": True, "note": STORED_NOTE}


def cap(result: JobResult, directory: Path, limit: int = RESULT_MAX_BYTES) -> JobResult:
    """`result` with its `data` (then its service_metadata, if still over) stored as a JSON file under
    `directory` when its JSON is over `limit` bytes (blocking I/O: run it in a thread). The reference takes
    the value's place and is listed in `outputs` too; the same object when the result is small enough."""
    if result_size(result, limit) <= limit:
        return result
    written: list[Path] = []
    try:
        data_ref = _stored(result.data, unique_path(directory, "result-data.json"))
        written.append(Path(data_ref["path"]))
        result = replace(result, data=data_ref, outputs=[*result.outputs, OutputFile(
            data_ref["path"], "application/json", data_ref["size_bytes"])])
        if result_size(result, limit) > limit:
            meta_ref = _stored(dict(result.service_metadata), unique_path(directory, "result-metadata.json"))
            written.append(Path(meta_ref["path"]))
            result = replace(result, service_metadata=meta_ref, outputs=[*result.outputs, OutputFile(
                meta_ref["path"], "application/json", meta_ref["size_bytes"])])
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    return result


def probe_dir(directory: Path) -> None:
    """Create `directory` and write, sync and remove a small file in it: raises the OSError that a job's
    outputs would meet there (no space, read-only, a file in the directory's place, no file descriptors)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".emp-probe-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
