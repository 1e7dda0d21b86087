"""One HTTP/1.1 keep-alive connection spoken by hand, for tests that must see exactly what goes over
the wire and whether the same connection keeps working."""

from __future__ import annotations

import socket

from velo_proxy.devtools.server import ServerThread


class Connection:
    """One HTTP/1.1 keep-alive connection, spoken by hand (no client library smoothing anything over)."""

    def __init__(self, server: ServerThread) -> None:
        self.host = server.host
        self.sock = socket.create_connection((server.host, server.port), timeout=15)
        self.pending = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, body: bytes, *, path: str = "/v1/chat/completions", content_length: int | None = None,
             method: str = "POST") -> None:
        length = len(body) if content_length is None else content_length
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {length}\r\n\r\n").encode()
        self.sock.sendall(head + body)

    def _read(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        return data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.pending:
            self.pending += self._read()
        head, self.pending = self.pending.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.pending:
                    self.pending += self._read()
                size_line, self.pending = self.pending.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.pending) < size + 2:
                    self.pending += self._read()
                body, self.pending = body + self.pending[:size], self.pending[size + 2:]
                if size == 0:
                    break
        else:
            length = int(headers.get("content-length", "0"))
            while len(self.pending) < length:
                self.pending += self._read()
            body, self.pending = self.pending[:length], self.pending[length:]
        return int(status_line.split()[1]), headers, body

    def exchange(self, body: bytes, **kwargs) -> tuple[int, dict[str, str], bytes]:
        self.send(body, **kwargs)
        return self.response()
