"""A worker sends what a response writes in one step of its loop in one write
(server/protocol.py): these check that nothing is held back, reordered or lost by it."""

from __future__ import annotations

import socket

from tests.server.conftest import get

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"  # the end of a chunked body: plain_asgi sends no Content-Length


def read_until(sock: socket.socket, done: bytes, count: int = 1) -> bytes:
    """Everything read until *done* has come *count* times (the socket's timeout bounds it)."""
    data = b""
    while data.count(done) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


def test_responses_come_whole_in_order_and_a_streamed_head_at_once(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve("plain_asgi:app", "--workers", "1", "--no-access-log")
    server.wait_ready(1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        # The head of a response whose body waits for the client comes at once: were
        # it held for the body, this read would time out.
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        head = read_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        sock.sendall(b"hello")
        assert read_until(sock, LAST_CHUNK) == b"5\r\nhello\r\n" + LAST_CHUNK

        # Three pipelined requests in one packet: three whole answers, in order.
        sock.sendall(REQUEST * 3)
        answers = read_until(sock, LAST_CHUNK, 3)
        assert answers.count(b"HTTP/1.1 200 ") == 3
        assert answers.endswith(LAST_CHUNK)

        # HEAD: a head and no body, on a connection that goes on serving.
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_until(sock, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
        sock.sendall(REQUEST)
        assert read_until(sock, LAST_CHUNK).startswith(b"HTTP/1.1 200 ")

        # Connection: close: the whole answer, then the end of the connection.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(LAST_CHUNK)
    assert get(server.port)[0] == 200
