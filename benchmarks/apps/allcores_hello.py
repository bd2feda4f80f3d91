"""Hello world served by an allcores cluster: the primary forks workers on one port.

Each worker runs uvicorn's own HTTP protocol (httptools on uvloop) on the connections
the cluster hands it, exactly as `uvicorn --workers 2` does, so the HTTP benchmark
measures the cluster (accepting and distributing connections), not the HTTP parser.

    BENCH_POLICY=balanced|rr|shared|reuseport  BENCH_WORKERS=2  BENCH_PORT=8000
    python benchmarks/apps/allcores_hello.py
"""

from __future__ import annotations

import os
from typing import Any

import uvicorn
import uvicorn.server
import uvloop
from hello import app  # the script's own folder is on sys.path

from allcores import cluster

PORT = int(os.environ.get("BENCH_PORT", "8000"))


def serve_in_worker() -> None:
    config = uvicorn.Config(app, http="httptools", loop="uvloop", access_log=False, lifespan="off")
    config.load()
    state = uvicorn.server.ServerState()

    protocol_class: Any = config.http_protocol_class  # typed as a bare asyncio.Protocol

    def factory() -> Any:
        return protocol_class(config=config, server_state=state, app_state={})

    async def main() -> None:
        server = await cluster.start_server(protocol_factory=factory, host="127.0.0.1", port=PORT)
        await server.serve_forever()

    uvloop.run(main())


if cluster.is_primary:
    cluster.scheduling_policy = os.environ.get("BENCH_POLICY", "balanced")
    for _ in range(int(os.environ.get("BENCH_WORKERS", "2"))):
        cluster.fork()
    cluster.run()  # blocks; SIGTERM/SIGINT stop it gracefully
else:
    serve_in_worker()
