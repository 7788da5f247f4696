"""A third-party connector installed the way pip installs one (a package plus a *.dist-info with
entry_points.txt on sys.path) is found by the registry and runs; `try_connector` reports every outcome."""

from __future__ import annotations

import asyncio
import re

import pytest
from _helpers import install_plugin
from fakes.comfyui import FakeComfyUI
from fakes.comfyui_nodes import full_type_name
from test_connector_comfyui import happy

from emp_machine.connectors.registry import ConnectorRegistry
from emp_machine.connectors.trying import try_connector

PLUGIN = '''
"""A connector from outside emp-machine: writes its payload's text to a file."""
from pathlib import Path
from pydantic import BaseModel, ConfigDict
from emp_machine.connectors.base import Connector, ConnectorSettings, JobResult, OutputFile


class EchoSettings(ConnectorSettings):
    suffix: str = "!"


class EchoConnector(Connector):
    name = "echo"
    Settings = EchoSettings

    async def run(self, job, progress):
        await progress(50, "halfway")
        path = Path(self.context.output_dir) / f"{job.id}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(job.payload["text"] + self.settings.suffix)
        return JobResult(data={"echoed": True}, outputs=[OutputFile(str(path), "text/plain", path.stat().st_size)])


class PlainSettings(BaseModel):  # a plain pydantic model, not ConnectorSettings: pydantic would ignore extras
    width: int = 8


class PlainConnector(Connector):
    name = "plain"
    Settings = PlainSettings

    async def run(self, job, progress):
        return JobResult(data={"width": self.settings.width})


class OpenSettings(BaseModel):
    model_config = ConfigDict(extra="allow")  # says it takes any key: taken at its word
    width: int = 8


class OpenConnector(PlainConnector):
    name = "open"
    Settings = OpenSettings


class LeakSettings(ConnectorSettings):
    api_key: str = ""


class LeakConnector(Connector):
    """Says its key in its progress, its log, its result or its error."""
    name = "leak"
    Settings = LeakSettings

    async def run(self, job, progress):
        key = self.settings.api_key
        self.log.warning("using %s", key)
        await progress(10, f"with {key}")
        if job.payload.get("fail"):
            raise ValueError(f"service refused {key}")
        return JobResult(data={"echo": key})


class BoomConnector(Connector):
    name = "boom"

    async def run(self, job, progress):
        return {}["a bug in a plugin"]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A distribution laid out as `pip install --target` leaves it, then put on sys.path."""
    site = tmp_path / "site"  # a fresh package per test: sys.modules keeps imports
    module = install_plugin(site, "emp_plugin_", PLUGIN, {"echo": "EchoConnector", "boom": "BoomConnector",
                                                        "plain": "PlainConnector", "open": "OpenConnector",
                                                        "leak": "LeakConnector"})
    monkeypatch.syspath_prepend(str(site))
    return module


def test_registry_finds_the_installed_plugin_beside_the_built_ins(plugin):
    registry = ConnectorRegistry.discover()
    assert {"echo", "boom", "simulation", "comfyui", "openai", "a1111", "rest"} <= set(registry.names())
    assert registry.get("echo").__module__ == plugin and registry.failures == []


def test_try_runs_the_plugin_and_prints_progress_and_outputs(plugin, tmp_path):
    lines: list[str] = []
    code = asyncio.run(try_connector("echo", {"suffix": "?"}, {"text": "hi"}, tmp_path / "out", lines.append))
    assert code == 0
    assert lines[0] == "progress  50.0% halfway" and lines[1] == "completed"
    assert lines[2].startswith(f"output {tmp_path / 'out'}/try-") and lines[2].endswith("(text/plain, 3 bytes)")
    assert '"echoed": true' in lines[3]


def test_a_plugin_raising_an_unexpected_exception_fails_only_its_job(plugin, tmp_path):
    lines: list[str] = []
    code = asyncio.run(try_connector("boom", {}, {}, tmp_path, lines.append))
    assert code == 1 and lines == ["failed (permanent): connector raised KeyError: 'a bug in a plugin'"]
    # the host is intact: the next job on another connector runs
    assert asyncio.run(try_connector("echo", {}, {"text": "ok"}, tmp_path, lines.append)) == 0


def test_try_reports_bad_settings_and_unknown_names(plugin, tmp_path):
    lines: list[str] = []
    assert asyncio.run(try_connector("echo", {"sufix": "?"}, {}, tmp_path, lines.append)) == 1
    assert lines[-1].startswith("error: connector 'echo'") and "bad settings: sufix: Extra inputs" in lines[-1]
    assert asyncio.run(try_connector("ecoh", {}, {}, tmp_path, lines.append)) == 1
    assert "did you mean 'echo'?" in lines[-1]


def test_a_plain_pydantic_settings_model_refuses_a_misspelt_key_too(plugin, tmp_path):
    """pydantic's default drops unknown keys: a plugin's plain BaseModel took `widht` and ran on width 8."""
    lines: list[str] = []
    assert asyncio.run(try_connector("plain", {"widht": 3}, {}, tmp_path, lines.append)) == 1
    assert "bad settings: widht: Extra inputs" in lines[-1], lines
    assert asyncio.run(try_connector("plain", {"width": 3}, {}, tmp_path, lines.append)) == 0
    assert '"width": 3' in lines[-1]
    # a model that says extra="allow" keeps its extras
    assert asyncio.run(try_connector("open", {"width": 3, "other": 1}, {}, tmp_path, lines.append)) == 0
    # and the manifest says it at load, with the path, the line and the nearest name
    from test_manifest import problems

    found = {p.path: p for p in problems("workers:\n  w:\n    connector: plain\n    settings:\n      widht: 3")}
    assert "workers.w.settings.widht" in found and found["workers.w.settings.widht"].line == 5, found
    assert "did you mean 'width'?" in found["workers.w.settings.widht"].hint


def test_try_masks_the_connectors_plain_secret_in_every_line_it_prints(plugin, tmp_path, capsys):
    from emp_machine.telemetry.redact import set_secret_values

    key = "plainKEY12345"
    lines: list[str] = []
    try:
        assert asyncio.run(try_connector("leak", {"api_key": key}, {}, tmp_path, lines.append)) == 0
        assert asyncio.run(try_connector("leak", {"api_key": key}, {"fail": True}, tmp_path, lines.append)) == 1
    finally:
        set_secret_values(())
    assert lines[0] == "progress  10.0% with [REDACTED]" and lines[-1].startswith("failed (permanent): "), lines
    assert '"echo": "[REDACTED]"' in "".join(lines) and not any(key in line for line in lines), lines
    err = capsys.readouterr().err  # its log records, where Python's last-resort handler showed them as they came
    assert "using [REDACTED]" in err and key not in err, err


def test_a_plugin_writing_to_its_job_dir_stays_in_the_output_folder(tmp_path):
    from emp_machine.connectors.base import ConnectorContext

    context = ConnectorContext(machine_id="m", worker_id="m-worker-0", output_dir=tmp_path / "out")
    for job_id in ("../../escape/x", "/etc/passwd", "..", "job-1"):
        assert context.job_dir(job_id).resolve().parent == (tmp_path / "out").resolve(), job_id
    assert context.job_dir("job-1") == tmp_path / "out" / "job-1"


def test_try_against_comfyui_prints_the_services_own_error(tmp_path):
    server = FakeComfyUI().start()
    try:
        lines: list[str] = []
        graph = {"1": {"class_type": "PrimitiveString", "inputs": {"value": "x"}},
                 "2": {"class_type": "RegexReplace", "inputs": {"string": ["1", 0], "regex_pattern": "(",
                                                                "replace": "y"}},
                 "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
        code = asyncio.run(try_connector("comfyui", {"base_url": server.url}, {"workflow": graph}, tmp_path,
                                         lines.append))
        assert code == 1 and lines[-1].startswith("failed (permanent): ComfyUI node 2 (RegexReplace) raised "
                                                  f"{full_type_name(re.error('x'))}: missing )")
        lines.clear()
        code = asyncio.run(try_connector("comfyui", {"base_url": server.url}, {"workflow": happy()}, tmp_path,
                                         lines.append))
        assert code == 0 and lines[0].startswith("progress   0.0% queued as prompt")
        assert len([line for line in lines if line.startswith("output ") and "image/png" in line]) == 2
    finally:
        server.close()
