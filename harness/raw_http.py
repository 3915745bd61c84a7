"""HTTP/1.1 over one raw keep-alive socket, for tests that must show a connection survives a refused request
(an HTTP client library would quietly open a new connection, hiding a reset)."""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


class RawConnection:
    """One TCP connection; `request` sends one request and reads its whole response."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        chunked: bool = False,
        declared_length: int | None = None,
    ) -> RawResponse:
        """Send a request (body as Content-Length, or `chunked`; `declared_length` overrides the header and sends
        nothing of the body: a client announcing more than the server accepts) and read the response."""
        head = [f"{method} {path} HTTP/1.1", "Host: test", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        else:
            head.append(f"Content-Length: {declared_length if declared_length is not None else len(body)}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if declared_length is None:
            # the server may refuse early and close; its answer may still be readable
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._send_body(body, chunked)
        return self._read_response()

    def _send_body(self, body: bytes, chunked: bool) -> None:
        if not chunked:
            self.sock.sendall(body)
            return
        step = 1 << 20
        for i in range(0, len(body), step):
            part = body[i : i + step]
            self.sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        self.sock.sendall(b"0\r\n\r\n")

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill()
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_response(self) -> RawResponse:
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                self._take(2)
            while self._line():  # trailers, then the blank line
                pass
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return RawResponse(status, headers, body)
