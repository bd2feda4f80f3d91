"""The admin endpoint: /metrics, /status, /healthz and /readyz from the primary."""

from __future__ import annotations

import json
import re

from tests.conftest import free_port, wait_until
from tests.server.conftest import get


def test_the_admin_endpoint_serves_metrics_status_and_probes(serve) -> None:  # type: ignore[no-untyped-def]
    admin = free_port()
    server = serve("plain_asgi:app", "--workers", "2", "--admin", str(admin))
    pids = server.wait_ready(2)
    for _ in range(10):
        get(server.port)
    # Workers write their counts into the scoreboard ten times a second.
    metrics = wait_until(lambda: _scraped(admin, at_least=10))
    for pid in pids:
        assert re.search(rf'allcores_requests_total{{pid="{pid}",worker="\d"}} \d+', metrics)
        assert f'allcores_request_duration_seconds_count{{pid="{pid}"' in metrics
        assert f'allcores_loop_lag_seconds{{pid="{pid}"' in metrics
    assert "allcores_workers 2.0" in metrics
    assert 'allcores_restarts_total{cause="crash"} 0.0' in metrics

    status, body = get(admin, "/status")
    assert status == 200 and {w["pid"] for w in json.loads(body)["workers"]} == pids
    assert get(admin, "/healthz") == (200, "ok\n")
    assert get(admin, "/readyz")[0] == 200
    assert get(admin, "/nothing")[0] == 404


def test_readyz_says_not_ready_while_no_worker_serves(serve) -> None:  # type: ignore[no-untyped-def]
    admin = free_port()
    server = serve(
        "plain_asgi:app", "--workers", "1", "--admin", str(admin), env={"APP_LIFESPAN_FAIL": "1"}
    )
    # Every worker fails its lifespan startup: the primary is alive, nothing serves.
    status = wait_until(lambda: _probe(admin))
    assert status == 503
    assert server.wait_exit(60) == 1


def _scraped(port: int, at_least: int) -> str | None:
    """/metrics, once the workers' requests add up to *at_least*."""
    status, metrics = get(port, "/metrics")
    assert status == 200
    answered = sum(
        float(value) for value in re.findall(r"allcores_requests_total\{[^}]*\} (\S+)", metrics)
    )
    return metrics if answered >= at_least else None


def _probe(port: int) -> int | None:
    try:
        return get(port, "/readyz", timeout=2)[0]
    except OSError:
        return None
