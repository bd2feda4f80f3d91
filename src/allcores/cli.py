"""The `allcores` command line."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

import click

from allcores import __version__

# The examples live in the source checkout next to src/; `allcores demo` runs them
# as they are, so what the demo shows is exactly what examples/ teaches.
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMOS = {
    "hybrid": "hybrid_server.py",
    "cluster": "cluster_server.py",
    "worker-threads": "worker_threads_server.py",
}


@click.group()
@click.version_option(__version__, prog_name="allcores")
def main() -> None:
    """Use every core from Python: Node's cluster and worker_threads, supervised."""


@main.command()
@click.option(
    "--example",
    type=click.Choice(sorted(DEMOS)),
    default=None,
    help="Run an example from examples/ instead of the served demo app.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default 8000).")
def demo(example: str | None, port: int | None) -> None:
    """Serve the seed's demo app with `allcores serve`, and say what to try."""
    if example is not None:
        _run_example(example, port)
        return
    from allcores import available_cpus
    from allcores.server.primary import run_primary
    from allcores.server.settings import ServeSettings

    port = 8000 if port is None else port
    # Half the cores serve HTTP; /cpu runs in the shared pool (one process per CPU,
    # niced, so / keeps answering while every pool process computes).
    workers = max(1, available_cpus() // 2)
    app = "allcores.server.demo_app:app"
    click.echo(f"allcores demo: allcores serve {app} --workers {workers} --port {port}")
    click.echo("Try, from another terminal:")
    click.echo(f"  curl localhost:{port}/         # answered by a worker (its pid)")
    click.echo(f"  curl localhost:{port}/cpu      # summed in a pool process; / still answers")
    click.echo(f"  allcores status --port {port}  # the workers, their requests and memory")
    click.echo(f"  allcores reload --port {port}  # new workers, one at a time, nothing lost")
    click.echo("  kill -9 <a worker pid>         # the primary replaces it at once")
    click.echo("Stop with Ctrl-C.")
    settings = ServeSettings.load({"app": app, "port": port, "workers": workers})
    sys.exit(run_primary(settings))


def _run_example(example: str, port: int | None) -> None:
    from allcores import cluster

    path = EXAMPLES / DEMOS[example]
    if not path.exists():
        raise click.ClickException(
            f"{path} not found: `allcores demo --example` runs the examples of a source "
            "checkout (git clone the repository, then ./dev demo --example ...)"
        )
    if port is not None:
        os.environ["PORT"] = str(port)
    shown_port = os.environ.get("PORT", "8001" if example == "worker-threads" else "8000")
    if cluster.is_primary:
        click.echo(f"allcores demo: running examples/{path.name} on port {shown_port}")
        click.echo("Try, from another terminal:")
        if example == "worker-threads":
            click.echo(f"  curl localhost:{shown_port}/        # the main thread's loop answers")
            click.echo(
                f"  curl localhost:{shown_port}/cpu     # a Worker per request; / still answers"
            )
            click.echo(
                f"  curl localhost:{shown_port}/cpu-pool  # the same on a pool (recommended)"
            )
        else:
            click.echo(f"  curl localhost:{shown_port}/        # answered by a worker (its pid)")
            click.echo(f"  curl localhost:{shown_port}/cpu     # CPU-heavy; / still answers")
            click.echo("  kill -9 <a worker pid>        # the primary logs it and starts another")
        click.echo("Stop with Ctrl-C.", err=False)
    sys.argv = [str(path)]
    runpy.run_path(str(path), run_name="__main__")


# `allcores serve`: each option defaults to None ("not given"), so that settings from
# pyproject.toml and ALLCORES_* apply unless the command line names the option
# (allcores.server.settings has the order). Values are parsed there, not by click, so
# every source gets the same checks and the same error messages.
_SERVE_OPTIONS: list[tuple[str, str]] = [
    ("--interface", "auto | asgi3 | asgi2 | wsgi (default auto: found from the app)."),
    ("--host", "Address to bind (default 127.0.0.1)."),
    ("--port", "Port to bind (default 8000)."),
    ("--uds", "Serve on this UNIX socket instead of --host/--port (a proxy in front)."),
    ("--workers", "HTTP worker processes: N or auto, one per usable CPU (default auto)."),
    ("--policy", "How connections reach workers: balanced | rr | shared | reuseport."),
    ("--engine", "HTTP engine: uvicorn (default) or granian (allcores[granian]; --policy shared)."),
    ("--pool", "CPU pool the workers share through offload: N, auto (one per CPU) or 0 (none)."),
    ("--pool-queue", "Tasks that may wait for a pool process; more: QueueFullError (1024)."),
    ("--pool-nice", "Niceness of pool processes above the HTTP workers, 0-19 (default 5)."),
    ("--app-dir", "Folder to import the app from, put first on sys.path (default .)."),
    ("--root-path", "ASGI root_path, for an app mounted below a proxy's path."),
    ("--forwarded-allow-ips", "Proxies trusted for X-Forwarded-* (default 127.0.0.1)."),
    ("--log-level", "critical | error | warning | info | debug | trace (default info)."),
    ("--http", "auto | httptools | h11 (default auto: httptools)."),
    ("--ws", "auto | websockets | wsproto | none (default auto)."),
    ("--lifespan", "auto | on | off (default auto)."),
    ("--timeout-keep-alive", "Seconds an idle keep-alive connection stays open (default 5)."),
    ("--timeout-graceful", "Seconds a draining worker may finish its requests (default 30)."),
    ("--timeout-hung", "Seconds a stuck loop lives, then is dumped and replaced (30; 0 off)."),
    ("--warn-blocking", "Log the stack of a loop blocked this long, once per line (0.1; 0 off)."),
    ("--max-requests", "Recycle a worker after this many requests (default 0: never)."),
    ("--max-requests-jitter", "Add 0..N to --max-requests per worker (default 0)."),
    ("--max-rss", "Recycle a worker past this resident memory, MiB (default 0: never)."),
    ("--max-lifetime", "Recycle a worker after this many seconds (default 0: never)."),
    ("--timeout-header", "Seconds a request head may take to arrive: slowloris (20; 0 off)."),
    ("--limit-request-line", "Longest request line, bytes, else 414 (default 8190)."),
    ("--limit-request-field-size", "Longest header field, bytes, else 431 (default 8190)."),
    ("--limit-request-fields", "Most header fields in a request, else 431 (default 100)."),
    ("--limit-concurrency", "Connections or requests per worker before 503s (default none)."),
    ("--backlog", "Listen backlog (default 2048)."),
    ("--wsgi-threads", "Threads per worker that run a WSGI app's calls (default 10)."),
    ("--admin", "PORT or HOST:PORT for /metrics, /status, /healthz, /readyz (default off)."),
    ("--control", "Path of the control socket (default: per user and port, see docs)."),
    ("--ssl-certfile", "TLS certificate file (PEM)."),
    ("--ssl-keyfile", "TLS private key file (PEM)."),
    ("--ssl-keyfile-password", "Password of the TLS key file."),
]


def _serve_options(command: Any) -> Any:
    for flag, help_text in reversed(_SERVE_OPTIONS):
        command = click.option(flag, default=None, help=help_text)(command)
    for flag, help_text in (
        ("--access-log/--no-access-log", "Log every request (default on)."),
        ("--proxy-headers/--no-proxy-headers", "Trust X-Forwarded-* from allowed IPs."),
    ):
        command = click.option(flag, default=None, help=help_text)(command)
    return command


@main.command()
@click.argument("app", required=False)
@click.option("--factory", is_flag=True, default=None, help="APP is a function making the app.")
@click.option(
    "--preload",
    is_flag=True,
    default=None,
    help="Import the app once in the primary; fork the workers from it (less memory, "
    "faster respawns; a reload then restarts workers, not code).",
)
@_serve_options
def serve(**options: Any) -> None:
    """Serve an ASGI or WSGI APP (MODULE:ATTRIBUTE) on every core.

    Options may also come from ALLCORES_<OPTION> variables or [tool.allcores] in
    pyproject.toml; see docs/serve.md.
    """
    from allcores.server.primary import run_primary
    from allcores.server.settings import ServeSettings, ServeSettingsError

    try:
        settings = ServeSettings.load(options)
    except ServeSettingsError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run_primary(settings))


def _where(command: Any) -> Any:
    """--port / --uds / --control: which running server a command talks to."""
    command = click.option(
        "--uds",
        default=None,
        type=click.Path(dir_okay=False),
        help="The UNIX socket the server listens on, if it was started with --uds.",
    )(command)
    command = click.option(
        "--control",
        default=None,
        type=click.Path(dir_okay=False),
        help="The server's control socket (default: found from --port).",
    )(command)
    return click.option(
        "--port",
        default=None,
        type=click.IntRange(0, 65535),
        help="The port the server listens on (default: as `allcores serve` here would "
        "take it, from ALLCORES_* or [tool.allcores]; else 8000).",
    )(command)


def _ask(
    port: int | None, uds: str | None, control: str | None, command: dict[str, Any]
) -> dict[str, Any]:
    from allcores.control.client import ControlError, default_path, request

    if control is None and uds is None and port is None:
        # What `allcores serve` here would use: ALLCORES_* or [tool.allcores].
        from allcores.server.settings import ServeSettings, ServeSettingsError

        try:
            found = ServeSettings.configured("control", "uds", "port")
        except ServeSettingsError as exc:
            raise click.UsageError(str(exc)) from None
        control, uds, port = found.get("control"), found.get("uds"), found.get("port", 8000)
    if control is not None:
        path = Path(control)
    elif uds is not None:
        path = default_path("unix:" + os.path.abspath(uds))
    else:
        path = default_path(port or 0)
    try:
        return request(path, command)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@_where
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(port: int | None, uds: str | None, control: str | None, as_json: bool) -> None:
    """Show a running server's workers: pid, state, uptime, requests, load, memory."""
    answer = _ask(port, uds, control, {"cmd": "status"})
    if as_json:
        answer.pop("ok", None)
        click.echo(json.dumps(answer, indent=2))
        return
    from allcores.server.status_table import print_status

    print_status(answer)


@main.command()
@_where
def reload(port: int | None, uds: str | None, control: str | None) -> None:
    """Replace every worker of a running server, one at a time (as SIGHUP does)."""
    answer = _ask(port, uds, control, {"cmd": "reload"})
    click.echo(f"reloading {answer['reloading']} worker(s), one at a time")


@main.command(context_settings={"ignore_unknown_options": True})
@_where
@click.argument("workers")
def scale(port: int | None, uds: str | None, control: str | None, workers: str) -> None:
    """Run WORKERS workers (N, +N or -N) in a running server."""
    answer = _ask(port, uds, control, {"cmd": "scale", "workers": workers})
    click.echo(f"scaling from {answer['was']} to {answer['workers']} worker(s)")


@main.command()
@_where
def stop(port: int | None, uds: str | None, control: str | None) -> None:
    """Stop a running server gracefully (as SIGTERM does)."""
    _ask(port, uds, control, {"cmd": "stop"})
    click.echo("stopping: workers finish their requests, then exit")
