"""The control socket of `allcores serve`: a running server, asked from outside.

::

    allcores status | reload | scale N | stop   (client.py, blocking, no event loop)
        │  one JSON object per line ─► UNIX socket, mode 0600, per user and port
        ▼
    primary's loop: ControlServer (server.py) ─► the serve primary's handlers
        ◄─ one JSON line back: {"ok": true, ...} or {"ok": false, "error": "..."}

JSON, never pickle: anything that can reach the socket gets a reply, not code run.
"""
