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
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlencode, urlsplit

import requests
from requests.structures import CaseInsensitiveDict

log = logging.getLogger("weightsync")


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


class InFlight:
    """A request already running in an adapter's thread (``Pending``): ``wait`` returns its
    checked answer, or raises what the request raised."""

    def __init__(self, future: Future, what: str) -> None:
        self._future, self.what = future, what

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout_s: float) -> object:
        try:
            return self._future.result(timeout=timeout_s)
        except FutureTimeout:
            if self._future.done():
                raise  # the request itself timed out: its own error says where
            raise TimeoutError(f"{self.what}: no answer within {timeout_s:.1f} s") from None


def retry_flush(
    attempt: Callable[[], str | None], retries: int, backoff_s: float, backoff_max_s: float
) -> str | None:
    """Run ``attempt`` (None: flushed; else the engine's reason) up to ``retries + 1`` times,
    sleeping ``backoff_s`` after the first refusal and doubling up to ``backoff_max_s``: an
    engine refuses while requests still hold cache blocks, which frees up within moments.
    Returns None once flushed, else the last reason."""
    delay, reason = backoff_s, None
    for i in range(retries + 1):
        reason = attempt()
        if reason is None:
            return None
        if i < retries:
            log.info("cache flush refused (%s), retry in %.2f s", reason, delay)
            time.sleep(delay)
            delay = min(2 * delay, backoff_max_s)
    return reason
