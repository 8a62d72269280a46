"""The SGLang tensor path with CUDA tensors (GPU only): real CUDA-IPC pickles.

The adapter's payload check unpickles dry: it must accept SGLang-patched CUDA payloads in the
producer process itself (where opening its own IPC handle would fail), reject a mismatched one,
and the same payloads must then open in a separate "engine" process exactly the way SGLang's
scheduler opens them (``monkey_patch_torch_reductions`` + ``MultiprocessingSerializer``).
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback

import pytest
import torch

from weightsync.engines.sglang_payloads import check_payload
from weightsync.plan import TensorMeta, build_plan, fill_bucket
from weightsync.transport.ipc import IpcPayloadSender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _engine_rank(payloads: list[str], rank: int, out: mp.Queue) -> None:
    try:
        out.put((rank, _open_own_payloads(payloads)))
    except BaseException:  # noqa: BLE001 - the parent reports the child's traceback
        out.put((rank, traceback.format_exc()))


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def _open_own_payloads(payloads: list[str]) -> dict[str, tuple[torch.dtype, bytes]]:
    """What an SGLang TP rank does with its own payload (scheduler side, sglang 0.5.23)."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    torch.cuda.set_device(0)
    monkey_patch_torch_reductions()
    got = {}
    for payload in payloads:
        obj = MultiprocessingSerializer.deserialize(payload)
        bucket = FlattenedTensorBucket(
            flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]
        )
        # Raw bytes back: CPU tensors in a queue would travel by fd from a process that exits.
        got.update((n, (t.dtype, _bytes(t))) for n, t in bucket.reconstruct_tensors())
        del obj, bucket
    torch.cuda.synchronize()
    return got


def _named() -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    named = {}
    for layer in range(3):
        p = f"model.layers.{layer}."
        named[p + "input_layernorm.weight"] = torch.randn(129, device="cuda", generator=g)
        named[p + "mlp.down_proj.weight"] = torch.randn(
            257, 511, device="cuda", generator=g
        ).bfloat16()
        named[p + "mlp.experts.0.w1.weight_packed"] = torch.randint(
            -(2**31), 2**31 - 1, (64, 33), dtype=torch.int32, device="cuda", generator=g
        )
    return named


def test_cuda_payloads_pass_the_dry_check_and_open_in_the_engine():
    named = _named()
    metas = [TensorMeta(n, t.dtype, tuple(t.shape), n.split(".mlp")[0]) for n, t in named.items()]
    plan = build_plan(metas, bucket_bytes=300_000)
    assert len(plan.buckets) >= 2
    sender = IpcPayloadSender("cuda", tp_size=2)
    tickets = []
    for bucket in plan.buckets:
        bufs = sender.buffers(bucket)
        fill_bucket(bucket, bufs, ((n, named[n]) for n in bucket.names()))
        tickets.append(sender.send(bucket, bufs))

    t0 = time.perf_counter()
    for bucket, ticket in zip(plan.buckets, tickets, strict=True):
        for rank, payload in enumerate(ticket.payloads):
            check_payload(payload, bucket, rank)  # dry: no handle is opened in the producer
    per_payload_ms = (time.perf_counter() - t0) * 1e3 / (2 * len(plan.buckets))
    print(f"dry payload check: {per_payload_ms:.2f} ms per CUDA payload")
    with pytest.raises(ValueError, match="payload for TP rank 0: metadata"):
        check_payload(tickets[0].payloads[0], plan.buckets[1], 0)

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ranks = [
        ctx.Process(target=_engine_rank, args=([t.payloads[r] for t in tickets], r, out))
        for r in range(2)
    ]
    for p in ranks:
        p.start()
    results = dict(out.get(timeout=90) for _ in ranks)
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    for ticket in tickets:
        sender.acknowledge(ticket)
    for rank in range(2):
        assert isinstance(results[rank], dict), results[rank]
        assert results[rank].keys() == named.keys()
        for name, tensor in named.items():
            assert results[rank][name] == (tensor.dtype, _bytes(tensor)), name
