"""A typed control channel over ``multiprocessing.Pipe()``: what an engine's HTTP API is to
the product, between two processes of a benchmark or a transport test.

Bucket metadata (``BucketMsg``: the layout and a ``Ticket``) travels ahead of the bytes, which
move on the transport; the receiver answers with ``AckMsg``. A failure travels as
``FailedMsg`` with the remote traceback as text and is raised by the peer's ``get``.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.plan import Bucket, Plan
from weightsync.transport.base import Ticket


@dataclass(frozen=True, slots=True)
class PlanMsg:
    plan: Plan
    version: str = ""


@dataclass(frozen=True, slots=True)
class SetupMsg:
    """Transport set-up sent once per session, e.g. a shm ``RingSpec``."""

    spec: object


@dataclass(frozen=True, slots=True)
class BucketMsg:
    bucket: Bucket
    ticket: Ticket


@dataclass(frozen=True, slots=True)
class AckMsg:
    ticket: Ticket


@dataclass(frozen=True, slots=True)
class DoneMsg:
    num_buckets: int


@dataclass(frozen=True, slots=True)
class FailedMsg:
    where: str
    traceback: str


Message = PlanMsg | SetupMsg | BucketMsg | AckMsg | DoneMsg | FailedMsg


class PipeChannel:
    """One end of ``multiprocessing.Pipe()``; every get times out."""

    def __init__(self, conn: Connection, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._conn = conn
        self.timeout_s = timeout_s

    def put(self, msg: Message) -> None:
        self._conn.send(msg)

    def get(self, timeout_s: float | None = None) -> Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self._conn.poll(timeout):
            raise TimeoutError(f"no control message within {timeout:.1f} s")
        msg = self._conn.recv()
        if isinstance(msg, FailedMsg):
            raise RuntimeError(f"peer failed in {msg.where}:\n{msg.traceback}")
        return msg

    def close(self) -> None:
        self._conn.close()
