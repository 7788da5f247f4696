"""ComfyUI message handling without I/O: payload parsing, progress arithmetic, error texts and classes.

Kept apart from the connector so each rule can be tested on the recorded payloads alone.
"""

from __future__ import annotations

from typing import Any

from emp_machine.errors import FatalJobError, RetryableJobError

# Exception class names (last dotted part of `exception_type`, §6.2) that say "this machine, now" rather
# than "this workflow": out of memory (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, MemoryError)
# and network failures of custom nodes that download (requests / urllib3 / aiohttp / builtins).
_TRANSIENT_TYPES = frozenset({
    "OutOfMemoryError", "MemoryError",
    "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError",
    "BrokenPipeError", "TimeoutError", "timeout", "Timeout", "ConnectTimeout", "ReadTimeout",
    "ProtocolError", "NewConnectionError", "MaxRetryError", "RemoteDisconnected", "IncompleteRead",
    "ClientConnectorError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
})
_TRANSIENT_TEXT = ("out of memory", "allocation on device")


def workflow_from_payload(payload: Any) -> dict:
    """The API-format graph from `{"workflow": graph}` or a bare graph; FatalJobError otherwise."""
    graph = payload.get("workflow", payload) if isinstance(payload, dict) else payload
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list) and "links" in graph:
        raise FatalJobError("the workflow is in ComfyUI's UI format; export it with 'Save (API Format)'")
    if not isinstance(graph, dict) or not graph:
        raise FatalJobError('comfyui payload must be {"workflow": {node_id: {"class_type", "inputs"}}} '
                            "or that graph itself")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise FatalJobError(f"workflow node {node_id!r} is not an object with a class_type")
    return graph


class ProgressTracker:
    """Overall percent from per-node `executing` and `progress` (value/max, floats allowed, §4.4).

    Each node of the graph is one equal share; a node counts as done when cached or when the next one
    starts; the running node adds its value/max fraction. Below 100 until the result is in hand, never
    going back, and reported only when it moved a whole percent or another node started (TestSleep alone
    sends a frame every 10 ms, §4.4)."""

    def __init__(self, graph: dict):
        self.graph = graph
        self.total = max(1, len(graph))
        self.done: set[str] = set()
        self.cached_nodes: set[str] = set()
        self.current: str | None = None
        self.fraction = 0.0
        self._reported = -1.0
        self._reported_node: str | None = None

    def cached(self, nodes: list[str]) -> None:
        self.cached_nodes.update(nodes)
        self.done.update(nodes)

    def executing(self, node: str) -> None:
        if self.current is not None and self.current != node:
            self.done.add(self.current)
        self.current, self.fraction = node, 0.0

    def tick(self, node: str, value: Any, maximum: Any) -> None:
        if node != self.current:
            self.executing(node)
        try:
            value, maximum = float(value), float(maximum)
        except (TypeError, ValueError):
            return
        if maximum > 0:
            self.fraction = min(1.0, max(0.0, value / maximum))

    def percent(self) -> float:
        running = self.fraction if self.current is not None and self.current not in self.done else 0.0
        return min(99.0, (len(self.done) + running) * 100 / self.total)

    def report(self) -> tuple[float | None, str]:
        """(percent, message) when worth reporting, else (None, "")."""
        percent = max(self.percent(), self._reported)
        if percent - self._reported < 1.0 and self.current == self._reported_node:
            return None, ""
        self._reported, self._reported_node = percent, self.current
        if self.current is None:
            return percent, f"{len(self.cached_nodes)} nodes cached"
        class_type = (self.graph.get(self.current) or {}).get("class_type", "?")
        return percent, f"node {self.current} ({class_type})"


def node_errors_text(node_errors: dict) -> str:
    """`node 3 (ImageScale): required_input_missing: Required input is missing (width); …`"""
    parts = []
    for node_id, entry in sorted((node_errors or {}).items()):
        entry = entry if isinstance(entry, dict) else {}
        for error in entry.get("errors") or [{}]:
            detail = f" ({error['details']})" if error.get("details") else ""
            parts.append(f"node {node_id} ({entry.get('class_type', '?')}): {error.get('type', '?')}: "
                         f"{error.get('message', '')}{detail}")
    return "; ".join(parts) or "(no details)"


def rejection_text(body: Any) -> str:
    """The 400 body of POST /prompt (§6.1) as one line: error type, message, details, node errors."""
    if not isinstance(body, dict):
        return str(body)[:500]
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    text = f"{error.get('type', '?')}: {error.get('message', '')}"
    if error.get("details"):
        text += f" ({error['details']})"
    if body.get("node_errors"):
        text += f"; {node_errors_text(body['node_errors'])}"
    return text


def execution_error(data: dict) -> FatalJobError | RetryableJobError:
    """An `execution_error` payload (§6.2) as a classified error naming node, class and exception.
    `current_inputs` and the traceback are left out: a tensor repr there is many kB (§6.2)."""
    exc_type = str(data.get("exception_type") or "Exception")
    exc_message = str(data.get("exception_message") or "").strip()
    text = (f"ComfyUI node {data.get('node_id', '?')} ({data.get('node_type', '?')}) raised "
            f"{exc_type}: {exc_message}")
    transient = (exc_type.rsplit(".", 1)[-1] in _TRANSIENT_TYPES
                 or any(t in exc_message.lower() for t in _TRANSIENT_TEXT))
    return RetryableJobError(text) if transient else FatalJobError(text)
