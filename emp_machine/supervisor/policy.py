"""What supervisord lacks, as plain decisions: exponential restart backoff, a restart window, a cool-down.

This module is imported inside the supervisord process (by `plugin.py`, which applies the decisions the
moment a child is reaped) and by the machine (for `ps` and health), so it stays free of heavy imports:
dataclasses and the standard library only.

PM2's behaviour is the model: a process that crashes after a stable run is restarted at once; one that keeps
crashing waits `initial * factor**(n-1)` (capped) before its n-th consecutive restart; too many restarts
inside the window and it is `errored`: left down, reported unhealthy, and tried again after `cooldown`
(where supervisord would leave it FATAL for good).
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field

ALWAYS = "always"
ON_FAILURE = "on-failure"
NEVER = "never"


@dataclass(frozen=True)
class RestartPolicy:
    policy: str = ALWAYS
    backoff_initial: float = 0.1
    backoff_factor: float = 2.0
    backoff_max: float = 30.0
    reset_after: float = 30.0
    max_restarts: int = 10
    window: float = 60.0
    cooldown: float = 300.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RestartPolicy":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Decision:
    """What to do after an exit: restart after `delay` seconds, or stay down (`errored` says why)."""

    restart: bool
    delay: float = 0.0
    errored: bool = False
    reason: str = ""


@dataclass
class RestartTracker:
    """Restart history of one process. Feed it exits; it answers with a Decision.

    `now` is always passed in (monotonic seconds) so the decisions are testable without a clock.
    """

    policy: RestartPolicy
    consecutive: int = 0
    restarts: int = 0
    errored: bool = False
    errored_since: float | None = None
    retry_at: float | None = None
    last_exit_status: int | None = None
    started_once: bool = False
    _recent: collections.deque = field(default_factory=collections.deque, repr=False)

    def on_exit(self, now: float, uptime: float, expected: bool, exit_status: int | None = None) -> Decision:
        self.last_exit_status = exit_status
        if self.policy.policy == NEVER or (self.policy.policy == ON_FAILURE and expected):
            return Decision(False, reason="exit not restarted by policy")
        if uptime >= self.policy.reset_after:
            self.consecutive = 0
        while self._recent and now - self._recent[0] > self.policy.window:
            self._recent.popleft()
        if len(self._recent) >= self.policy.max_restarts:
            return self._to_errored(
                now, f"{len(self._recent)} restarts within {self.policy.window:g}s (max {self.policy.max_restarts})"
            )
        delay = self.backoff_delay(self.consecutive)
        self.consecutive += 1
        self.restarts += 1
        self._recent.append(now + delay)
        return Decision(True, delay=delay)

    def on_fatal(self, now: float, reason: str) -> Decision:
        """supervisord gave up on its own (e.g. the command cannot be executed): errored, retried later."""
        return self._to_errored(now, reason)

    def on_cooldown_retry(self) -> None:
        """The cool-down passed and the process is being started again: a fresh window, backoff kept."""
        self.errored = False
        self.errored_since = None
        self.retry_at = None
        self._recent.clear()
        self.restarts += 1

    def on_manual_start(self) -> None:
        """The machine or an operator started the process: a restart when it ran before; forget errored."""
        if self.started_once:
            self.restarts += 1
        self.started_once = True
        self.errored = False
        self.errored_since = None
        self.retry_at = None
        self._recent.clear()
        self.consecutive = 0

    def backoff_delay(self, consecutive: int) -> float:
        """Delay before the restart that follows `consecutive` earlier quick crashes (0 for the first)."""
        if consecutive <= 0:
            return 0.0
        delay = self.policy.backoff_initial * self.policy.backoff_factor ** (consecutive - 1)
        return min(delay, self.policy.backoff_max)

    def _to_errored(self, now: float, reason: str) -> Decision:
        self.errored = True
        self.errored_since = now
        self.retry_at = now + self.policy.cooldown
        return Decision(False, errored=True, reason=reason)

    def snapshot(self, now: float) -> dict:
        return {
            "restarts": self.restarts,
            "consecutive_crashes": self.consecutive,
            "errored": self.errored,
            "retry_in": None if self.retry_at is None else max(0.0, self.retry_at - now),
            "next_delay": self.backoff_delay(self.consecutive),
            "last_exit_status": self.last_exit_status,
        }
