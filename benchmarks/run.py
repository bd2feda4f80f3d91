"""Side-by-side benchmarks of allcores against its anchors.

    python benchmarks/run.py setup                       build the anchors' venv, install wrk
    python benchmarks/run.py http --runs 5 --duration 10 hello world: uvicorn, gunicorn, allcores
    python benchmarks/run.py pool --repeats 3            PPE, loky, pebble, anyio, allcores
    python benchmarks/run.py seed --runs 3               the seed's /cpu-versus-/ experiment
    python benchmarks/run.py reload --runs 3             failed requests over 3 reloads
    python benchmarks/run.py import --runs 30            import allcores vs concurrent.futures
    python benchmarks/run.py pool --quick                tiny settings: proves the harness runs
    python benchmarks/run.py report results/pool-….json  the tables again, from the samples

Run it with the project's interpreter (.venv-3.11/bin/python): allcores runs from it,
the anchors from benchmarks/.anchors-venv, which `setup` (or any subcommand) builds with
pinned versions. Each command prints a table and writes JSON to benchmarks/results/
(or to --out). The method is that of benchmarks/README.md; figures and the
commands that made them are in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

# The modules beside this script import as top-level modules: Python puts the script's
# folder first on sys.path.
import bench_env
import bench_http
import bench_import
import bench_pool
import bench_reload
import bench_seed

# --quick: enough to go through every code path once, in seconds, on any machine.
QUICK = {"runs": 1, "repeats": 1, "duration": 1, "warmup": 1}
# wrk takes whole seconds, hence int durations.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
        p.add_argument("--out", type=Path, help="JSON result path (default benchmarks/results/)")
        p.add_argument(
            "--anchors-python",
            help="run the anchors with this interpreter instead of benchmarks/.anchors-venv "
            "(only the anchors it has will run; for the smoke test)",
        )

    sub.add_parser("setup", help="build the anchors' venv and install wrk")

    report = sub.add_parser("report", help="recompute and print the tables of a result file")
    report.add_argument("result", type=Path, help="a JSON file this harness wrote")
    report.add_argument(
        "--write", action="store_true", help="store the recomputed summary in the file"
    )

    http = sub.add_parser("http", help="hello world under each server")
    common(http)
    http.add_argument("--runs", type=int, default=5)
    http.add_argument("--duration", type=int, default=10, help="seconds of wrk per sample")
    http.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up")
    http.add_argument("--connections", type=int, default=64)
    http.add_argument("--workers", type=int, default=2)
    http.add_argument(
        "--servers",
        default=",".join(bench_http.DEFAULT_SERVERS),
        help="comma-separated, from: "
        + ", ".join(bench_http.DEFAULT_SERVERS + bench_http.OPTIONAL_SERVERS),
    )

    reload = sub.add_parser("reload", help="failed requests while each server reloads")
    common(reload)
    reload.add_argument("--runs", type=int, default=3)
    reload.add_argument("--gap", type=float, default=3.0, help="seconds between reloads")
    reload.add_argument("--connections", type=int, default=32)
    reload.add_argument("--workers", type=int, default=2)
    reload.add_argument(
        "--servers",
        default=",".join(bench_reload.SERVERS),
        help="comma-separated, from: "
        + ", ".join(bench_http.DEFAULT_SERVERS + bench_http.OPTIONAL_SERVERS),
    )

    pool = sub.add_parser("pool", help="task pools side by side")
    common(pool)
    pool.add_argument("--repeats", type=int, default=3)
    pool.add_argument("--workers", type=int, default=2, help="workers of every pool")
    pool.add_argument("--pools", default=",".join(bench_pool.POOLS))
    pool.add_argument("--workloads", default=",".join(bench_pool.WORKLOADS))

    seed = sub.add_parser("seed", help="the seed's experiment: /cpu load against /")
    common(seed)
    seed.add_argument("--runs", type=int, default=3)
    seed.add_argument("--duration", type=int, default=10)
    seed.add_argument("--warmup", type=int, default=2)
    seed.add_argument("--variants", default=",".join(bench_seed.VARIANTS))
    imports = sub.add_parser("import", help="import cost, fresh interpreters, best of N")
    imports.add_argument("--runs", type=int, default=30, help="interpreters per statement")
    imports.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    imports.add_argument("--out", type=Path, help="JSON result path (default benchmarks/results/)")
    return parser


def _split(text: str, allowed: list[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown name(s) {unknown}; choose from {allowed}")
    return names


def _anchors(args: argparse.Namespace) -> str:
    return str(args.anchors_python) if args.anchors_python else bench_env.ensure_anchors_venv()


def _wrk() -> str:
    wrk = bench_env.ensure_wrk()
    if wrk is None:
        raise SystemExit("wrk is not installed and could not be installed (apt-get install wrk)")
    return wrk


def _finish(
    name: str, args: argparse.Namespace, result: dict[str, Any], text: str, env: dict[str, Any]
) -> None:
    payload = {
        "benchmark": name,
        "command": shlex.join([_shown_path(sys.executable), *sys.argv]),
        **env,
        **result,
    }
    path = bench_env.write_result(name, payload, args.out)
    print(text)
    print(f"\n{env['date']}, {env['machine']['cpus']} CPUs; JSON: {path}")


def _shown_path(path: str) -> str:
    """A path relative to the repository when inside it, so commands can be pasted."""
    absolute = Path(path).absolute()
    root = bench_env.REPO_ROOT
    return str(absolute.relative_to(root)) if absolute.is_relative_to(root) else path


def report(path: Path, write: bool) -> str:
    """Recompute summary and goals from a result file's samples, and render its tables."""
    result = json.loads(path.read_text())
    settings, samples = result["settings"], result["samples"]
    if result["benchmark"] == "import":
        result["summary"] = bench_import.summaries(samples)
        result["goals"] = bench_import.goals(result["summary"])
        text = bench_import.render(result)
    elif result["benchmark"] == "http":
        result["summary"] = bench_http.summaries(samples, settings["servers"])
        result["goals"] = bench_http.goals(result["summary"])
        text = bench_http.render(result)
    elif result["benchmark"] == "reload":
        result["summary"] = bench_reload.summaries(samples)
        result["goals"] = bench_reload.goals(result["summary"])
        text = bench_reload.render(result)
    elif result["benchmark"] == "pool":
        result["summary"] = bench_pool.summaries(samples, settings["workloads"], settings["pools"])
        result["goals"] = bench_pool.goals(result["summary"])
        text = bench_pool.render(result)
    else:
        why = {v: st["skipped"] for v, st in result["summary"].items()}
        result["summary"] = bench_seed.summaries(samples, list(why), why)
        result["goals"] = bench_seed.goals(result["summary"])
        text = bench_seed.render(result)
    if write:
        path.write_text(json.dumps(result, indent=2) + "\n")
    return f"{text}\n\n{result['date']}: {result['command']}"


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "report":
        print(report(args.result, args.write))
        return
    if args.command == "setup":
        print(bench_env.ensure_anchors_venv())
        print(bench_env.ensure_wrk() or "wrk could not be installed")
        return
    if args.command == "import":
        # The anchor is the stdlib, in the project's interpreter: no anchors' venv.
        runs = QUICK["runs"] if args.quick else args.runs
        result = bench_import.run_import_benchmark(bench_env.project_python(), runs)
        result["summary"] = bench_import.summaries(result["samples"])
        result["goals"] = bench_import.goals(result["summary"])
        env = bench_env.describe_environment(None, None)
        _finish("import", args, result, bench_import.render(result), env)
        return
    anchors = _anchors(args)
    project = bench_env.project_python()
    if args.command == "pool":
        pools = _split(args.pools, bench_pool.POOLS)
        if "allcores" in pools and not bench_env.allcores_has("from allcores.pool import Pool"):
            print("allcores.pool.Pool is not importable: leaving allcores out", file=sys.stderr)
            pools.remove("allcores")
        settings = bench_pool.PoolSettings(
            repeats=QUICK["repeats"] if args.quick else args.repeats,
            quick=args.quick,
            pools=pools,
            workloads=_split(args.workloads, bench_pool.WORKLOADS),
            anchors_python=anchors,
            project_python=project,
            workers=args.workers,
        )
        env = bench_env.describe_environment(anchors, None)
        result = bench_pool.run_pool_benchmark(settings)
        _finish("pool", args, result, bench_pool.render(result), env)
        return
    wrk = _wrk()
    if args.command == "reload":
        allowed = bench_http.DEFAULT_SERVERS + bench_http.OPTIONAL_SERVERS
        http_settings = bench_http.HttpSettings(
            runs=1,
            duration_s=0,
            warmup_s=0,
            connections=args.connections,
            servers=[],
            workers=args.workers,
            anchors_python=anchors,
            project_python=project,
            wrk=wrk,
        )
        reload_settings = bench_reload.ReloadSettings(
            runs=QUICK["runs"] if args.quick else args.runs,
            gap_s=0.5 if args.quick else args.gap,
            lead_s=1.0 if args.quick else 2.0,
            connections=args.connections,
            servers=_split(args.servers, allowed),
            http=http_settings,
        )
        env = bench_env.describe_environment(anchors, wrk)
        result = bench_reload.run_reload_benchmark(reload_settings)
        _finish("reload", args, result, bench_reload.render(result), env)
        return
    if args.command == "http":
        allowed = bench_http.DEFAULT_SERVERS + bench_http.OPTIONAL_SERVERS
        servers = _split(args.servers, allowed)
        if any(s.startswith("allcores-") for s in servers) and not bench_env.allcores_has(
            "from allcores import cluster; cluster.start_server"
        ):
            print(
                "allcores.cluster is not ready: leaving the allcores servers out", file=sys.stderr
            )
            servers = [s for s in servers if not s.startswith("allcores-")]
        http_settings = bench_http.HttpSettings(
            runs=QUICK["runs"] if args.quick else args.runs,
            duration_s=QUICK["duration"] if args.quick else args.duration,
            warmup_s=QUICK["warmup"] if args.quick else args.warmup,
            connections=args.connections,
            servers=servers,
            workers=args.workers,
            anchors_python=anchors,
            project_python=project,
            wrk=wrk,
        )
        env = bench_env.describe_environment(anchors, wrk)
        result = bench_http.run_http_benchmark(http_settings)
        _finish("http", args, result, bench_http.render(result), env)
        return
    seed_settings = bench_seed.SeedSettings(
        runs=QUICK["runs"] if args.quick else args.runs,
        duration_s=QUICK["duration"] if args.quick else args.duration,
        warmup_s=QUICK["warmup"] if args.quick else args.warmup,
        variants=_split(args.variants, bench_seed.VARIANTS),
        anchors_python=anchors,
        project_python=project,
        wrk=wrk,
        cpu_n=200_000 if args.quick else 2_000_000,
    )
    env = bench_env.describe_environment(anchors, wrk)
    result = bench_seed.run_seed_benchmark(seed_settings)
    _finish("seed", args, result, bench_seed.render(result), env)


if __name__ == "__main__":
    main()
