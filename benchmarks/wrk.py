"""Run wrk against 127.0.0.1 and read its report."""

from __future__ import annotations

import re
import resource
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")

# wrk's own -d bound plus this margin is the most a run may take before we give up on it.
WRK_MARGIN_S = 15.0


@dataclass
class WrkResult:
    requests_per_s: float
    requests: int
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non_2xx: int
    wrk_cpu_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse(output: str, wrk_cpu_s: float = 0.0) -> WrkResult:
    """Read the numbers out of ``wrk --latency`` output; raises ValueError if absent."""
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None:
        raise ValueError(f"not a wrk report:\n{output[-1000:]}")
    percentiles = {m[1]: float(m[2]) * _UNITS[m[3]] for m in _PERCENTILE.finditer(output)}
    errors = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests_per_s=float(rps[1]),
        requests=int(total[1]),
        p50_ms=percentiles.get("50"),
        p99_ms=percentiles.get("99"),
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        wrk_cpu_s=wrk_cpu_s,
    )


def wrk_argv(wrk: str, url: str, connections: int, duration_s: float, latency: bool) -> list[str]:
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError("the benchmarks send traffic to 127.0.0.1 only")
    if duration_s < 1 or duration_s != int(duration_s):
        raise ValueError(f"wrk takes whole seconds of duration, not {duration_s}")
    argv = [wrk, "-t1", f"-c{connections}", f"-d{int(duration_s)}s"]
    return [*argv, "--latency", url] if latency else [*argv, url]


def run_wrk(
    wrk: str, url: str, connections: int, duration_s: float, latency: bool = True
) -> WrkResult:
    """Run wrk to completion; its CPU time comes from the children's rusage delta."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        wrk_argv(wrk, url, connections, duration_s, latency),
        capture_output=True,
        text=True,
        timeout=duration_s + WRK_MARGIN_S,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {proc.stderr[-500:]}")
    return parse(proc.stdout, cpu)


def start_wrk(wrk: str, url: str, connections: int, duration_s: float) -> subprocess.Popen[str]:
    """Start wrk in the background (the seed's /cpu load); read it with finish_wrk."""
    return subprocess.Popen(
        wrk_argv(wrk, url, connections, duration_s, latency=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_wrk(proc: subprocess.Popen[str], duration_s: float) -> WrkResult:
    try:
        out, err = proc.communicate(timeout=duration_s + WRK_MARGIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=WRK_MARGIN_S)
        raise RuntimeError("wrk did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {err[-500:]}")
    return parse(out)
