"""Every setting of a cluster primary, in one validated object.

`cluster.setup_primary(...)`, the `allcores` CLI and environment variables all map
onto `ClusterSettings`; nothing deeper in the cluster reads the environment.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, Literal

from allcores.errors import AllcoresError

__all__ = ["POLICIES", "ClusterSettings", "SettingsError"]

Policy = Literal["balanced", "rr", "shared", "reuseport"]
POLICIES: tuple[Policy, ...] = ("balanced", "rr", "shared", "reuseport")
RespawnRule = bool | Callable[[Any, int | None, str | None], bool]


class SettingsError(AllcoresError, ValueError):
    """A cluster setting has a value it cannot take."""


def default_policy() -> Policy:
    # Passing accepted fds needs SCM_RIGHTS, which every Unix has; the load-aware
    # policy is the default wherever it can run.
    return "balanced" if sys.platform != "win32" else "shared"


@dataclasses.dataclass
class ClusterSettings:
    exec: str | None = None
    """Program a worker runs: None reruns this program (Node's semantics)."""
    args: Sequence[str] | None = None
    """Arguments for `exec`; None reuses this process's arguments."""
    silent: bool = False
    """True: workers' stdout and stderr are not shown (they are still kept for crash reports)."""
    scheduling_policy: Policy = dataclasses.field(default_factory=default_policy)
    respawn: RespawnRule = False
    """Replace a worker that exits unplanned: True, or a rule (worker, code, signal) -> bool."""
    respawn_delay: float = 0.1
    """First respawn delay (s). It doubles per consecutive crash of the same slot, up to
    `respawn_delay_max`, with ±50 % jitter so a fleet of crashing workers does not restart
    in lockstep."""
    respawn_delay_max: float = 10.0
    crash_loop_limit: int = 5
    """This many unplanned exits within `crash_loop_window` seconds stop the primary
    (exit code 1). Five in 30 s tells a crash loop from a rare fault: a worker that dies
    once a minute is respawned forever, one that dies at boot stops the cluster in ~3 s."""
    crash_loop_window: float = 30.0
    boot_period: float = 5.0
    """A worker that exits before it listens and within this many seconds of starting
    failed while booting (reported as such)."""
    graceful_timeout: float = 30.0
    """On stop or disconnect, in-flight work gets this long before workers are killed;
    30 s matches gunicorn and Kubernetes' default termination grace period."""
    heartbeat_stale: float = 0.25
    """A worker whose loop has not beaten for this long gets no new connections under
    `balanced` while another can take them: five missed 50 ms beats, long enough to
    ride out a GC pause, short enough that a request stuck behind CPU work is rare."""
    ready_timeout: float = 60.0
    """In a reload, a new worker must listen within this many seconds, or the reload
    stops and the old workers serve on: long enough for an app that loads a model
    at startup, short enough that a hung boot does not stall reloads for ever."""
    timeout_hung: float = 0.0
    """A serving worker whose loop has not beaten for this many seconds has its
    stack logged, then is killed and replaced; 0 turns the watchdog off (the
    default for a plain cluster, whose workers may not run an event loop)."""
    max_requests: int = 0
    """Recycle a worker once it has answered this many requests (0: never), plus a
    random 0..`max_requests_jitter`, so workers started together are not recycled
    together. Only `allcores serve` counts requests."""
    max_requests_jitter: int = 0
    max_rss_mb: float = 0.0
    """Recycle a worker whose resident memory passes this many MiB (0: never)."""
    max_lifetime: float = 0.0
    """Recycle a worker that has been up this many seconds (0: never)."""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    """Extra environment for every worker."""
    max_workers: int = 1024
    """Scoreboard capacity: the most workers alive at once (about 150 bytes each)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.scheduling_policy not in POLICIES:
            raise SettingsError(
                f"unknown scheduling policy {self.scheduling_policy!r}; "
                f"choose one of {', '.join(POLICIES)}"
            )
        if self.scheduling_policy == "reuseport" and not hasattr(
            __import__("socket"), "SO_REUSEPORT"
        ):
            raise SettingsError("policy 'reuseport' needs SO_REUSEPORT, which this OS lacks")
        for name in ("respawn_delay", "respawn_delay_max", "crash_loop_window", "ready_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "boot_period",
            "graceful_timeout",
            "heartbeat_stale",
            "timeout_hung",
            "max_requests",
            "max_requests_jitter",
            "max_rss_mb",
            "max_lifetime",
        ):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.crash_loop_limit < 1:
            raise SettingsError(f"crash_loop_limit must be >= 1, got {self.crash_loop_limit}")
        if self.max_workers < 1:
            raise SettingsError(f"max_workers must be >= 1, got {self.max_workers}")
        if not (isinstance(self.respawn, bool) or callable(self.respawn)):
            raise SettingsError("respawn must be True, False or a callable(worker, code, signal)")

    def update(self, **changes: Any) -> None:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SettingsError(f"unknown cluster setting(s): {', '.join(sorted(unknown))}")
        previous = dataclasses.asdict(self)
        for name, value in changes.items():
            setattr(self, name, value)
        try:
            self.validate()
        except SettingsError:
            for name in changes:
                setattr(self, name, previous[name])
            raise
