"""The prefetch thread of the sync data path: order, errors, draining, bounded look-ahead."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from weightsync.pipeline import Prefetcher


def _tensors(n: int, pulled: list[int]):
    for i in range(n):
        pulled.append(i)
        yield f"t{i}", torch.full((4,), float(i))


def test_order_and_values_are_kept() -> None:
    pulled: list[int] = []
    got = list(Prefetcher(_tensors(50, pulled), depth=2))
    assert [n for n, _ in got] == [f"t{i}" for i in range(50)]
    assert all(float(t[0]) == i for i, (_, t) in enumerate(got))


def test_look_ahead_is_bounded_by_depth() -> None:
    pulled: list[int] = []
    p = Prefetcher(_tensors(100, pulled), depth=2)
    next(p)
    time.sleep(0.3)
    # one consumed, two queued, one produced and blocked on the full queue
    assert len(pulled) <= 4
    p.close()


def test_close_drains_the_source_in_its_thread() -> None:
    pulled: list[int] = []
    p = Prefetcher(_tensors(100, pulled), depth=1)
    next(p)
    p.close()  # a failed send: peers need every unit pulled
    assert pulled == list(range(100))
    assert not any(t.name == "weightsync-prefetch" for t in threading.enumerate())


def test_producer_error_reaches_the_consumer() -> None:
    def broken():
        yield "a", torch.zeros(1)
        raise ValueError("tensor 'b' is not finite")

    p = Prefetcher(broken())
    assert next(p)[0] == "a"
    with pytest.raises(ValueError, match="'b'"):
        next(p)
    p.close()


def test_a_stuck_producer_times_out() -> None:
    def stuck():
        time.sleep(1.0)
        yield "a", torch.zeros(1)

    p = Prefetcher(stuck(), timeout_s=0.2)
    with pytest.raises(TimeoutError):
        next(p)
    p.timeout_s = 5
    p.close()


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter(()), depth=0)
