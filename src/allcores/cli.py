"""The `allcores` command line."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

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
    help="Which example to run (default: hybrid if present, else cluster).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default 8000).")
def demo(example: str | None, port: int | None) -> None:
    """Run an example server from examples/ and say what to try."""
    from allcores import cluster

    if example is None:
        example = "hybrid" if (EXAMPLES / DEMOS["hybrid"]).exists() else "cluster"
    path = EXAMPLES / DEMOS[example]
    if not path.exists():
        raise click.ClickException(
            f"{path} not found: `allcores demo` runs the examples of a source checkout "
            "(git clone the repository, then ./dev demo)"
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
