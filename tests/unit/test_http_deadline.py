"""Every engine call has an overall deadline: a server that trickles its answer cannot hold a
pause (or anything else) past the configured timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest


@pytest.fixture
def trickler():
    """A loopback server that answers every request with headers, then one body byte every
    0.2 s for 10 s (each socket read succeeds: per-read timeouts never fire)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve(conn):
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            for _ in range(50):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    srv.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_trickling_engine_cannot_hold_a_call_past_its_deadline(trickler, kind):
    from weightsync.config import SyncConfig
    from weightsync.engines.spec import EngineSpec

    engine = EngineSpec(kind=kind, url=trickler).connect(SyncConfig(step_timeout_s=1.0))
    for _ in range(2):  # the second is timed: the first also imports SGLang's request structs
        t0 = time.monotonic()
        with pytest.raises(Exception, match=r"within 1\.0 s"):
            engine.pause("abort")
    seconds = time.monotonic() - t0
    print(f"\n{kind}: trickling server cut off after {seconds:.3f} s (deadline 1 s)")
    assert seconds < 2.0  # 1 s deadline; the answer would take 10 s
    engine.close()


def test_answers_within_the_deadline_come_back_whole():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from weightsync.engines.http import DeadlineSession

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reply = b'{"path": "%s", "key": "%s", "body": %s}' % (
                self.path.encode(),
                self.headers["Authorization"].encode("latin-1"),
                body,
            )
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = DeadlineSession()
        session.headers["Authorization"] = "Bearer k"
        url = f"http://127.0.0.1:{server.server_address[1]}/pause"
        r = session.request("POST", url, timeout=5, json={"a": [1, 2]}, params={"mode": "keep"})
        assert r.status_code == 200
        assert r.json() == {"path": "/pause?mode=keep", "key": "Bearer k", "body": {"a": [1, 2]}}
    finally:
        server.shutdown()
