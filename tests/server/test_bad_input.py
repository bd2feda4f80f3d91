"""Bad input gets a clear answer, and the server keeps serving everyone else."""

from __future__ import annotations

import signal
import socket

from tests.server.conftest import get


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send *data*, return all the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_malformed_and_oversized_requests_get_4xx(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1", "--no-access-log")
    server.wait_ready(1)
    long_line = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert raw(server.port, long_line).startswith(b"HTTP/1.1 414 ")
    huge_header = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    assert raw(server.port, huge_header).startswith(b"HTTP/1.1 431 ")
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n"
    assert raw(server.port, many).startswith(b"HTTP/1.1 431 ")
    assert raw(server.port, b"\x16\x03\x01 garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert get(server.port)[0] == 200


def test_slowloris_connections_are_closed_at_the_header_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "2", "--timeout-header", "1", "--no-access-log")
    server.wait_ready(2)
    slow = []
    try:
        for _ in range(200):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            slow.append(sock)
        # Meanwhile everyone else is served.
        assert all(get(server.port)[0] == 200 for _ in range(10))
        answers = [sock.recv(1024) for sock in slow]
    finally:
        for sock in slow:
            sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)


def test_a_flood_of_garbage_writes_a_few_log_lines_not_one_each(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1", "--no-access-log")
    server.wait_ready(1)
    for _ in range(300):
        assert raw(server.port, b"BAD\x00 REQUEST\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert get(server.port)[0] == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0  # and with it, every line the worker wrote
    assert 1 <= server.output.count("Invalid HTTP request received") <= 3
