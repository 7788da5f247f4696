"""The worker's guard against inline blobs in a job's result.

The contract says results must not carry large inline blobs: outputs are files under the machine's output
directory, passed by reference. The built-in connectors store their images themselves; a connector that
passes a service's answer through (rest, a third party's) may still return a base64 image or a huge text.
Before a result is recorded, `spill` moves such values into files beside the connector's own outputs and
puts the reference in their place (the same shape as `JobResult.outputs` entries, which list them too):

- a `data:<mime>;base64,...` URI of at least DATA_URI_MIN characters: decoded, with the mime type it names;
- a string of at least BASE64_MIN characters that is base64: decoded, its type sniffed from its bytes;
- any other string of at least TEXT_MIN characters: stored as text.

The scan is a walk over the result's data and metadata (cheap for the small results of most jobs); files
are written only when something is found.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from emp_machine.connectors._http import safe_name, sniff_image_suffix, unique_path
from emp_machine.connectors.base import JobResult, OutputFile

DATA_URI_MIN = 1024
BASE64_MIN = 16 * 1024
TEXT_MIN = 256 * 1024

_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,", re.ASCII)
_BASE64 = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}", re.ASCII)


def _kind(value: str) -> str | None:
    """'data-uri', 'base64', 'text' or None (kept inline)."""
    size = len(value)
    if size >= DATA_URI_MIN and value.startswith("data:") and _DATA_URI.match(value):
        return "data-uri"
    if size >= BASE64_MIN and _BASE64.fullmatch(value):
        return "base64"
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
