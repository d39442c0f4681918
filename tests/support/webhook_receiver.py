"""A real webhook receiver on loopback (``http.server`` in a thread): it records every POST it
gets (headers and body) and answers 500 to the next ``fail_next`` ones (then 200), or, with
``hang``, holds every request unanswered until it is stopped (``arrivals`` notes when each
came). It can be stopped and started again on the same port (a receiver that was down)."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def job(self) -> str:
        return str(json.loads(self.body)["data"]["id"])


class Receiver:
    def __init__(self, fail_next: int = 0, hang: bool = False, port: int | None = None) -> None:
        self.fail_next = fail_next
        self.arrivals: list[float] = []  # time.monotonic() of each request's arrival
        self.hang = hang
        self.port = port or free_port()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.arrivals.append(time.monotonic())
                if receiver.hang:
                    receiver._release.wait(120)
                with receiver._lock:
                    failing = receiver.fail_next > 0 or receiver.hang
                    receiver.fail_next -= failing and not receiver.hang
                    status = 500 if failing else 200
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(headers, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._release.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.status == 200]

    def wait_for(self, n: int = 1, timeout_s: float = 30, job: str | None = None) -> list[Received]:
        """The requests answered 200 (of ``job``'s events), once there are ``n``."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = [r for r in self.delivered() if job is None or r.job == job]
            if len(got) >= n:
                return got
            assert time.monotonic() < deadline, f"receiver got {len(got)} of {n} deliveries"
            time.sleep(0.05)

    def of(self, job: str) -> list[Received]:
        """Every request about ``job``, in arrival order."""
        with self._lock:
            return [r for r in self.received if r.job == job]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
