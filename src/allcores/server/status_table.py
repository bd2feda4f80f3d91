"""`allcores status` as a table, in the manner of ``pm2 ls``, drawn with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_status"]

_STATE_STYLE = {"serving": "green", "starting": "yellow", "draining": "cyan", "dead": "red"}


def print_status(status: dict[str, Any], console: Console | None = None) -> None:
    # Not on a terminal (a pipe, a log), rich would wrap at 80 columns.
    console = console or Console(width=None if Console().is_terminal else 120)
    restarts = status.get("restarts") or {}
    restart_text = ", ".join(f"{cause} {count}" for cause, count in sorted(restarts.items()))
    console.print(
        f"[bold]{status['app']}[/]: primary pid {status['pid']}, up {_age(status['uptime'])}, "
        f"{status['policy']}, {status['serving']} serving, "
        f"restarts: {restart_text or 'none'}"
    )
    table = Table(header_style="bold")
    for column in ("id", "pid", "state", "up", "requests", "in flight", "conns"):
        table.add_column(column, justify="left" if column == "state" else "right", no_wrap=True)
    for column in ("RSS", "CPU", "loop lag", "lag max"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in status["workers"]:
        state = row["state"]
        table.add_row(
            str(row["id"]),
            str(row["pid"]),
            f"[{_STATE_STYLE.get(state, 'white')}]{state}[/]",
            _age(row["uptime"]),
            f"{row['requests']:,}",
            str(row["in_flight"]),
            str(row["connections"]),
            f"{row['rss'] / 1048576:.0f} MB",
            f"{row['cpu']:.0f} %",
            f"{row['lag_ms']:.1f} ms",
            f"{row['lag_max_ms']:.0f} ms",
        )
    pool = status.get("pool")
    if pool:
        processes = pool["processes"]
        table.add_row(
            "pool",
            "",
            f"{pool['busy']}/{pool['size']} busy",
            "",
            f"{pool['tasks']:,}",
            str(pool["busy"] + pool["queue"]),
            "",
            f"{sum(p['rss'] for p in processes) / 1048576:.0f} MB",
            f"{sum(p['cpu'] for p in processes):.0f} %",
            "",
            "",
        )
    console.print(table)
    if pool:
        restarts = ", ".join(f"{c} {n}" for c, n in sorted(pool["restarts"].items())) or "none"
        console.print(
            f"pool: {pool['size']} processes, queue {pool['queue']}/{pool['queue_limit']}, "
            f"run p50 {_ms(pool['run_ms']['p50'])} p99 {_ms(pool['run_ms']['p99'])}, "
            f"wait p50 {_ms(pool['wait_ms']['p50'])} p99 {_ms(pool['wait_ms']['p99'])}, "
            f"replaced: {restarts}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"≤{value:g} ms"


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h"
    return f"{seconds // 86400:.0f}d"
