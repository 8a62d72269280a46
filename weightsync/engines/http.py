"""HTTP calls with an overall deadline, for the engine adapters.

``requests``' timeout bounds each socket read, not the call: a server that trickles its answer
a byte at a time holds a call (and the engines' pause) for as long as it likes. Here a timer
shuts the socket down when the deadline passes, which wakes a read blocked in it; the call then
raises ``requests.Timeout``. Answers come back as ``requests.Response`` objects, so the adapters'
handling of status codes and bodies is unchanged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
from urllib.parse import urlencode, urlsplit

import requests
from requests.structures import CaseInsensitiveDict


class DeadlineSession:
    """The slice of ``requests.Session`` the adapters use; one connection per call."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}

    def request(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        json: object | None = None,
        params: dict | None = None,
    ) -> requests.Response:
        return call(method, url, timeout_s=timeout, headers=self.headers, body=json, params=params)

    def get(self, url: str, *, timeout: float) -> requests.Response:
        return self.request("GET", url, timeout=timeout)

    def close(self) -> None:
        """Nothing held between calls."""


def call(
    method: str,
    url: str,
    *,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    body: object | None = None,
    params: dict | None = None,
) -> requests.Response:
    """One HTTP call that returns or raises within ``timeout_s`` seconds (plus scheduling)."""
    u = urlsplit(url)
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    if params:
        path += ("&" if "?" in path else "?") + urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if data is not None else {}
    # Values as UTF-8 bytes: http.client would encode str as latin-1 (a non-ASCII key fails).
    sent = {k: v.encode() for k, v in (sent | dict(headers or {})).items()}
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = cls(u.hostname, u.port, timeout=timeout_s)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if expired.is_set():
            raise TimeoutError
        conn.request(method, path, body=data, headers=sent)
        answer = conn.getresponse()
        content = answer.read()
        if expired.is_set():
            raise TimeoutError
    except (OSError, http.client.HTTPException) as e:
        if expired.is_set() or isinstance(e, TimeoutError):
            raise requests.Timeout(
                f"{method} {url}: no complete answer within {timeout_s:.1f} s"
            ) from None
        raise requests.ConnectionError(f"{method} {url}: {e}") from e
    finally:
        timer.cancel()
        conn.close()
    response = requests.Response()
    response.status_code = answer.status
    response.reason = answer.reason
    response.headers = CaseInsensitiveDict(answer.getheaders())
    response._content = content
    response.url = url
    response.encoding = "utf-8"
    return response
