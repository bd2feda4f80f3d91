"""Where each side of a comparison runs, and what it runs with.

The anchors (uvicorn, gunicorn, granian, loky, pebble, anyio) live in their own virtual
environment, ``benchmarks/.anchors-venv``, built here with pinned versions, never as
dependencies of allcores. allcores runs from the project's own environment (the
interpreter that runs this harness, normally ``.venv-3.11``). ``wrk`` comes from Debian.

Every result file records the versions found in both interpreters, the wrk version,
the allcores commit, the date and the command line, so a figure can be traced to the
run that made it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
APPS_DIR = BENCH_DIR / "apps"
RESULTS_DIR = BENCH_DIR / "results"
ANCHORS_VENV = BENCH_DIR / ".anchors-venv"

# The versions of docs/PERFORMANCE.md and benchmarks/README.md. anyio is pinned to
# the release current when the harness was written (2026-11-28); all are on PyPI.
ANCHOR_PINS: dict[str, str] = {
    "gunicorn": "27.0.1",
    "uvicorn-worker": "0.4.0",
    "uvicorn": "0.54.0",
    "uvloop": "0.23.0",
    "httptools": "0.9.0",
    "granian": "2.8.9",
    "loky": "3.7.0",
    "Pebble": "5.2.3",
    "anyio": "4.16.0",
}

# Packages whose versions matter on the allcores side (same HTTP stack as the anchors).
PROJECT_PACKAGES = ["allcores", "uvicorn", "uvloop", "httptools", "psutil", "cloudpickle"]

# Installing the anchors downloads a few wheels; 10 minutes covers a slow mirror.
PIP_TIMEOUT_S = 600
# `apt-get update` plus the wrk package; 5 minutes each is ample on this network.
APT_TIMEOUT_S = 300


def project_python() -> str:
    """The interpreter that runs allcores: the one running this harness."""
    return sys.executable


def anchors_python() -> str:
    return str(ANCHORS_VENV / "bin" / "python")


def _installed_versions(python: str, packages: list[str]) -> dict[str, str | None]:
    code = (
        "import json, sys\n"
        "from importlib import metadata\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n"
        "        out[name] = None\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [python, "-c", code, *packages], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        return dict.fromkeys(packages)
    result: dict[str, str | None] = json.loads(proc.stdout)
    return result


def ensure_anchors_venv(log: bool = True) -> str:
    """Create or repair the anchors' venv so it holds exactly the pinned versions."""
    python = anchors_python()
    if not Path(python).exists():
        if log:
            print(f"creating {ANCHORS_VENV} ...", file=sys.stderr)
        subprocess.run(
            [_base_python(), "-m", "venv", str(ANCHORS_VENV)], check=True, timeout=PIP_TIMEOUT_S
        )
    found = _installed_versions(python, list(ANCHOR_PINS))
    if all(found[name] == version for name, version in ANCHOR_PINS.items()):
        return python
    pins = [f"{name}=={version}" for name, version in ANCHOR_PINS.items()]
    if log:
        print(f"installing anchors: {' '.join(pins)}", file=sys.stderr)
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins],
        check=True,
        timeout=PIP_TIMEOUT_S,
    )
    return python


def _base_python() -> str:
    """The interpreter the project venv was made from, so both sides share a CPython build."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return str(base)


def ensure_wrk(log: bool = True) -> str | None:
    """Return the path of wrk, installing Debian's package first if root can."""
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return found
    if log:
        print("installing wrk with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        try:
            subprocess.run(
                argv, check=True, timeout=APT_TIMEOUT_S, env=env, capture_output=True, text=True
            )
        except (subprocess.SubprocessError, OSError) as exc:
            if log:
                print(f"could not install wrk ({' '.join(argv)}): {exc}", file=sys.stderr)
            return None
    return shutil.which("wrk")


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    first = (proc.stdout or proc.stderr).splitlines()
    return first[0].strip() if first else "unknown"


def allcores_has(module_check: str, python: str | None = None) -> bool:
    """True when ``python -c module_check`` succeeds (e.g. ``from allcores import cluster``)."""
    proc = subprocess.run(
        [python or project_python(), "-c", module_check],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )
    return proc.returncode == 0


def git_commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=10,
        check=False,
    )
    return proc.stdout.strip() or "unknown"


def describe_environment(anchors: str | None, wrk: str | None) -> dict[str, object]:
    """Versions, machine and date, stored in every result file."""
    versions: dict[str, object] = {
        "project_python": platform.python_version(),
        "project": _installed_versions(project_python(), PROJECT_PACKAGES),
        "allcores_commit": git_commit(),
    }
    if anchors is not None:
        versions["anchors"] = _installed_versions(anchors, list(ANCHOR_PINS))
        versions["anchors_python"] = anchors
    if wrk is not None:
        versions["wrk"] = wrk_version(wrk)
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_at_start": list(os.getloadavg()),
        },
        "versions": versions,
    }


def write_result(name: str, payload: dict[str, object], out: Path | None) -> Path:
    """Write the JSON result to ``out`` or to benchmarks/results/<name>-<UTC time>.json."""
    if out is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS_DIR / f"{name}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return out
