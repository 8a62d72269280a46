"""Control channel tests, plus the process helpers the other transport tests share."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable

import pytest
import torch

from benchmarks.channel import DoneMsg, FailedMsg, PipeChannel
from weightsync.plan import TensorMeta, build_plan
from weightsync.transport.base import Ticket

CTX = mp.get_context("spawn")
WORKER_TIMEOUT_S = 120.0


def mixed_metas(num_layers: int = 3, width: int = 64) -> list[TensorMeta]:
    """bf16, fp32, int32 and int64 tensors in units shaped like a small (int4) model."""
    metas = [TensorMeta("model.embed_tokens.weight", torch.bfloat16, (50, width), "embed")]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        metas += [
            TensorMeta(f"{p}.input_layernorm.weight", torch.float32, (width,), f"{p}.ln"),
            TensorMeta(f"{p}.q.weight_packed", torch.int32, (width, width // 8), f"{p}.q"),
            TensorMeta(f"{p}.q.weight_scale", torch.bfloat16, (width, width // 32), f"{p}.q"),
            TensorMeta(f"{p}.q.weight_shape", torch.int64, (2,), f"{p}.q"),
            TensorMeta(f"{p}.mlp.weight", torch.bfloat16, (2 * width, width), f"{p}.mlp"),
        ]
    return metas


def make_tensor(meta: TensorMeta, seed: int) -> torch.Tensor:
    """Random bits of the tensor's dtype (NaN payloads and all), reproducible from the seed."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + hash_name(meta.name))
    nbytes = meta.dtype.itemsize * int(torch.Size(meta.shape).numel())
    raw = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    return raw.view(meta.dtype).view(meta.shape)


def hash_name(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % 100_000


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def mismatches(named: list[tuple[str, torch.Tensor]], metas: list[TensorMeta], seed: int):
    by_name = {m.name: m for m in metas}
    return [n for n, t in named if not torch.equal(bits(t), bits(make_tensor(by_name[n], seed)))]


def _child(idx: int, fn: Callable, args: tuple, results) -> None:
    try:
        results.put((idx, "ok", fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure, assertions too, goes to the parent
        results.put((idx, "err", traceback.format_exc()))


def run_workers(jobs: list[tuple[Callable, tuple]], timeout_s: float = WORKER_TIMEOUT_S) -> list:
    """Run each (fn, args) in its own spawned process; return results in order or fail."""
    results = CTX.Queue()
    procs = [CTX.Process(target=_child, args=(i, fn, a, results)) for i, (fn, a) in enumerate(jobs)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors = []
    end = time.monotonic() + timeout_s
    try:
        while len(out) + len(errors) < len(jobs):
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail(f"workers did not finish within {timeout_s} s: got {sorted(out)}")
            try:
                idx, status, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:  # no result yet: fail early if children died without one
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and not any(p.exitcode is None for p in procs):
                    pytest.fail(f"workers {dead} died: exit codes {[p.exitcode for p in procs]}")
                continue
            if status == "ok":
                out[idx] = value
            else:
                errors.append(f"worker {idx}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    if errors:
        pytest.fail("\n".join(errors))
    return [out[i] for i in range(len(jobs))]


def test_pipe_channel_carries_typed_messages_and_times_out():
    a, b = CTX.Pipe()
    left, right = PipeChannel(a, timeout_s=0.2), PipeChannel(b, timeout_s=0.2)
    plan = build_plan(mixed_metas(1))
    left.put(DoneMsg(len(plan.buckets)))
    assert right.get() == DoneMsg(1)
    with pytest.raises(TimeoutError, match=r"no control message within 0\.2 s"):
        right.get()
    left.put(FailedMsg("sender", "Traceback: boom"))
    with pytest.raises(RuntimeError, match="peer failed in sender:\nTraceback: boom"):
        right.get()
    assert Ticket(3).slot == -1 and Ticket(3).payloads == ()


def _echo_sum(x: int, y: int) -> int:
    return x + y


def _raise(msg: str) -> None:
    raise ValueError(msg)


@pytest.mark.slow
def test_run_workers_reports_remote_tracebacks():
    assert run_workers([(_echo_sum, (1, 2)), (_echo_sum, (3, 4))]) == [3, 7]
    with pytest.raises(pytest.fail.Exception, match="ValueError: tensor 'x' is bad"):
        run_workers([(_raise, ("tensor 'x' is bad",))])
