"""The restart policy's decisions (pure) and the rendered supervisord config (parsed by supervisord itself)."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from supervisor.datatypes import dict_of_key_value_pairs

from emp_machine.errors import SupervisorError
from emp_machine.supervisor.config import Paths, ProcessSpec, env_value_problem, render, write
from emp_machine.supervisor.policy import RestartPolicy, RestartTracker


def test_backoff_grows_exponentially_and_is_capped():
    t = RestartTracker(RestartPolicy(backoff_initial=0.1, backoff_factor=2, backoff_max=0.5, max_restarts=100))
    delays = [t.on_exit(now=i, uptime=0.01, expected=False).delay for i in range(6)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.5, 0.5]


def test_a_stable_run_resets_the_backoff():
    t = RestartTracker(RestartPolicy(backoff_initial=1, reset_after=30, max_restarts=100))
    for i in range(3):
        t.on_exit(now=i, uptime=0.1, expected=False)
    assert t.on_exit(now=100, uptime=31, expected=False).delay == 0.0
    assert t.on_exit(now=101, uptime=0.1, expected=False).delay == 1.0


def test_restart_window_leads_to_errored_then_cooldown_gives_a_fresh_window():
    t = RestartTracker(RestartPolicy(backoff_initial=0, max_restarts=3, window=10, cooldown=60))
    assert all(t.on_exit(now=i, uptime=0, expected=False).restart for i in range(3))
    decision = t.on_exit(now=3, uptime=0, expected=False)
    assert not decision.restart and decision.errored and "3 restarts within 10s" in decision.reason
    assert t.errored and t.retry_at == 63
    t.on_cooldown_retry()
    assert not t.errored and t.on_exit(now=64, uptime=0, expected=False).restart


def test_the_cooldown_retry_opens_a_fresh_window_even_inside_the_old_one():
    # The retry comes 5 s after the errored verdict, well inside the 60 s window: its next crash is restarted,
    # not errored at once by the old window's entries (mutation audit M7; the test above retries after the
    # window had emptied, so it could not tell).
    t = RestartTracker(RestartPolicy(backoff_initial=0, max_restarts=3, window=60, cooldown=5))
    assert all(t.on_exit(now=i, uptime=0, expected=False).restart for i in range(3))
    assert t.on_exit(now=3, uptime=0, expected=False).errored
    t.on_cooldown_retry()
    assert t.on_exit(now=9, uptime=0, expected=False).restart


def test_a_manual_start_forgets_the_crash_loops_backoff():
    # `emp-machine restart` is deliberate: the next crash restarts at once (mutation audit M7).
    t = RestartTracker(RestartPolicy(backoff_initial=1, max_restarts=100, reset_after=30))
    for i in range(4):
        t.on_exit(now=i, uptime=0, expected=False)
    assert t.snapshot(5)["next_delay"] > 0
    t.on_manual_start()
    assert t.snapshot(10)["next_delay"] == 0.0
    assert t.on_exit(now=11, uptime=0, expected=False).delay == 0.0


def test_old_restarts_fall_out_of_the_window():
    t = RestartTracker(RestartPolicy(backoff_initial=0, max_restarts=2, window=10))
    t.on_exit(now=0, uptime=0, expected=False)
    t.on_exit(now=1, uptime=0, expected=False)
    assert t.on_exit(now=20, uptime=0, expected=False).restart


@pytest.mark.parametrize("policy,expected,restart", [
    ("always", True, True), ("always", False, True), ("on-failure", True, False), ("on-failure", False, True),
    ("never", False, False),
])
def test_restart_policies(policy, expected, restart):
    assert RestartTracker(RestartPolicy(policy=policy)).on_exit(0, 100, expected).restart is restart


def test_manual_start_counts_as_a_restart_and_clears_errored():
    t = RestartTracker(RestartPolicy(max_restarts=1))
    t.on_manual_start()
    assert t.restarts == 0
    t.on_exit(0, 0, False)
    t.on_exit(1, 0, False)
    assert t.errored
    t.on_manual_start()
    assert not t.errored and t.restarts == 2


def _parse(text: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read_string(text)
    return parser


def test_environment_values_survive_supervisord_parsing(tmp_path):
    values = {"PLAIN": "abc", "PERCENT": "50%% off %(here)s", "COMMA": "a,b=c", "DQ": 'say "hi" now',
              "SQ": "it's", "SPACE": "a b  c", "EMPTY": "", "URL": "redis://:p@h:1/0?x=1&y=2"}
    spec = ProcessSpec(name="p", argv=("/bin/true",), kind="service", env=values)
    text = render([spec], Paths(tmp_path), parent_pid=1, machine_id="m", log_max_bytes=1, log_backups=1)
    raw = _parse(text).get("program:p", "environment")
    # supervisord expands %(...)s before it splits the pairs: mimic it the way it does (doubled % -> %)
    assert dict_of_key_value_pairs(raw.replace("%%", "%")) == values


@pytest.mark.parametrize("value", ["both ' and \"", "'starts", 'ends"', "line\nbreak"])
def test_values_supervisord_cannot_carry_are_refused(tmp_path, value):
    assert env_value_problem(value)
    spec = ProcessSpec(name="p", argv=("/bin/true",), kind="service", env={"V": value})
    with pytest.raises(SupervisorError, match="environment variable V of p"):
        render([spec], Paths(tmp_path), parent_pid=1, machine_id="m", log_max_bytes=1, log_backups=1)


def test_program_sections_and_private_files(tmp_path):
    specs = [ProcessSpec(name="worker-0", argv=("python", "-c", "print('a b')"), kind="worker", stop_grace=7.4,
                         stop_signal="INT", restart=RestartPolicy(max_restarts=4))]
    paths = Paths(tmp_path / "state")
    write(specs, paths, parent_pid=42, machine_id="m", log_max_bytes=1024, log_backups=2)
    conf = _parse(paths.conf.read_text())
    program = dict(conf.items("program:worker-0"))
    assert program["command"] == "python -c 'print('\"'\"'a b'\"'\"')'"
    assert (program["autostart"], program["autorestart"], program["stopsignal"]) == ("false", "false", "INT")
    assert program["stopwaitsecs"] == "8" and program["stopasgroup"] == "true"
    assert conf.get("rpcinterface:emp", "parent_pid") == "42"
    assert conf.get("unix_http_server", "file") == str(paths.socket)
    assert not conf.has_section("inet_http_server")
    assert paths.run.stat().st_mode & 0o777 == 0o700
    assert paths.conf.stat().st_mode & 0o777 == 0o600 and paths.policy.stat().st_mode & 0o777 == 0o600
    assert '"max_restarts": 4' in paths.policy.read_text()


def test_socket_path_too_long_is_a_clear_error(tmp_path):
    deep = Path(tmp_path, *(["d" * 30] * 4))
    with pytest.raises(SupervisorError, match="over the unix limit.*machine.state_dir"):
        write([], Paths(deep), parent_pid=1, machine_id="m", log_max_bytes=1, log_backups=1)
