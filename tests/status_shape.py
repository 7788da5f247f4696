"""The contract's machine status message (../shared/emp-redis-contract.md), checked field by field."""

from __future__ import annotations

PHASES = {"starting", "ready", "draining", "shutdown"}
UPDATE_TYPES = {"periodic", "event_driven", "machine_ready", "shutdown"}
PM2 = {"online", "launching", "stopped", "errored"}


def check_status_message(msg: dict, machine_id: str, worker_ids: list[str]) -> None:
    assert set(msg) == {"machine_id", "timestamp", "update_type", "health_url", "structure", "status"}, set(msg)
    assert msg["machine_id"] == machine_id
    assert isinstance(msg["timestamp"], int) and msg["timestamp"] > 1_600_000_000_000  # epoch ms
    assert msg["update_type"] in UPDATE_TYPES
    assert isinstance(msg["health_url"], str) and msg["health_url"].startswith(("http://", "https://"))
    assert "localhost" not in msg["health_url"] and "127.0.0.1" not in msg["health_url"]
    structure, status = msg["structure"], msg["status"]
    assert set(structure) == {"gpu_count", "capabilities", "workers", "services"}
    assert isinstance(structure["gpu_count"], int) and structure["gpu_count"] >= 0
    assert isinstance(structure["capabilities"], list) and all(isinstance(c, str) for c in structure["capabilities"])
    assert sorted(structure["workers"]) == sorted(worker_ids)
    for wid, w in structure["workers"].items():
        assert set(w) == {"worker_id", "gpu_id", "worker_type", "services", "connectors"}
        assert w["worker_id"] == wid and isinstance(w["worker_type"], str)
        assert w["gpu_id"] is None or isinstance(w["gpu_id"], int)
        assert isinstance(w["services"], list) and isinstance(w["connectors"], list)
    assert set(structure["services"]) == set(status["services"])
    for key, s in structure["services"].items():
        wid, _, service = key.partition(".")
        assert wid in worker_ids and service
        assert set(s) == {"worker_id", "service_type", "status", "health"}
        assert s["worker_id"] == wid and s["service_type"] == service
    assert set(status) == {"machine", "workers", "services"}
    assert set(status["machine"]) == {"phase", "uptime_ms"}
    assert status["machine"]["phase"] in PHASES
    assert isinstance(status["machine"]["uptime_ms"], int) and status["machine"]["uptime_ms"] >= 0
    assert sorted(status["workers"]) == sorted(worker_ids)
    for w in status["workers"].values():
        assert set(w) == {"is_connected", "status", "current_job_id", "last_activity", "version"}
        assert isinstance(w["is_connected"], bool)
        assert w["status"] in {"idle", "busy", "offline"}
        assert isinstance(w["current_job_id"], str) and isinstance(w["last_activity"], str)
        assert (w["status"] == "busy") or w["current_job_id"] == ""
    for s in status["services"].values():
        assert set(s) == {"status", "health", "pm2_status"}
        assert s["status"] in {"active", "inactive"}
        assert s["health"] in {"healthy", "unhealthy", "unknown"}
        assert s["pm2_status"] in PM2
