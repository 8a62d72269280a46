"""The trainer side of one weight update: plan, check, export, quantize, send.

Runs on every rank of the trainer job (the export is a collective); only the exporter's source
rank (global rank 0) holds engines and a transport sender::

    ws = WeightSender(model_chunks, hf_config, sync_config, int4_config)
    ws.prepare(engines)                # all ranks, BEFORE any engine is paused: plan, identical
                                       # on every rank; finite weights; engines accept the plan
    ... the orchestrator pauses, flushes and opens the engines' update sessions ...
    stats = ws.send(engines, sender)   # all ranks: export -> int4 -> buckets -> engines

Bucket k+1 is exported, quantized and copied while bucket k is on the wire and being loaded:
the acknowledgement of bucket k is awaited only after bucket k+1 has been handed off.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from weightsync.config import SyncConfig
from weightsync.engines.base import Engine, Pending
from weightsync.engines.vllm_plugin.wire import sha256
from weightsync.plan import Bucket, Plan, TensorMeta, build_plan, check_plan_identical
from weightsync.quant import Int4Config, packed_meta, quantize_named
from weightsync.transport.base import Sender, Ticket, send_stream


@dataclass
class SendStats:
    """Seconds spent in each stage on the source rank (stages overlap: see module doc)."""

    export_s: float = 0.0
    quantize_s: float = 0.0
    transfer_s: float = 0.0
    engine_load_s: float = 0.0
    nbytes: int = 0
    num_buckets: int = 0
    engine_errors: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    """sha256 of every tensor sent (``SyncConfig.verify``), to compare with the engines'."""


def plan_metas(hf_metas: Iterable[Any], int4: Int4Config | None) -> list[TensorMeta]:
    """Exporter metadata -> what the engines receive (int4 packing applied), unit by unit."""
    return [
        TensorMeta(name, dtype, shape, m.unit)
        for m in hf_metas
        for name, shape, dtype in packed_meta(m.name, tuple(m.shape), m.dtype, int4)
    ]


def _finite(t: torch.Tensor) -> bool:
    # min/max propagate NaN and keep Inf: two reductions, no bool temporary of the tensor's
    # size (isfinite().all() is ~60x slower on CPU and dominated prepare() at 1B params).
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite(model_chunks: Sequence[torch.nn.Module]) -> None:
    """ValueError on EVERY rank if any rank holds a NaN/Inf parameter shard (names them)."""
    bad = [
        f"rank {dist.get_rank() if dist.is_initialized() else 0}: {name}"
        for i, chunk in enumerate(model_chunks)
        for name, p in chunk.named_parameters()
        if p.is_floating_point() and not _finite(p)
    ]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = [b for rank_bad in everyone for b in rank_bad]
    if bad:
        raise ValueError(f"non-finite weights (NaN/Inf), nothing was sent: {bad[:5]}")


class WeightSender:
    def __init__(
        self,
        model_chunks: Sequence[torch.nn.Module],
        hf_config: Any,
        config: SyncConfig,
        int4: Int4Config | None = None,
    ) -> None:
        self.model_chunks = list(model_chunks)
        self.hf_config = hf_config
        self.config = config
        self.int4 = int4
        self.plan: Plan | None = None

    @property
    def is_source(self) -> bool:
        from megatron_bridge import EXPORT_SOURCE_RANK

        return not dist.is_initialized() or dist.get_rank() == EXPORT_SOURCE_RANK

    def prepare(self, engines: Sequence[Engine] = ()) -> Plan:
        """Everything that can fail on bad input, done before any engine is paused."""
        from megatron_bridge import hf_weight_metadata

        metas = plan_metas(hf_weight_metadata(self.model_chunks, self.hf_config), self.int4)
        plan = build_plan(metas, self.config.bucket_bytes)
        if dist.is_initialized() and dist.get_world_size() > 1:
            check_plan_identical(plan)
        check_finite(self.model_chunks)
        for engine in engines:
            engine.validate(plan)
        self.plan = plan
        return plan

    def send(self, engines: Sequence[Engine], sender: Sender | None) -> SendStats:
        """Stream the model to ``engines`` (source rank) or take part in the export (others)."""
        from megatron_bridge import export_hf_weights

        assert self.plan is not None, "prepare() first"
        stats = SendStats(nbytes=self.plan.total_nbytes, num_buckets=len(self.plan.buckets))
        stream = _timed(export_hf_weights(self.model_chunks, self.hf_config), stats)
        if not self.is_source:
            for _ in stream:
                pass
            return stats
        assert sender is not None, "the source rank needs a transport sender"
        try:
            self._send(engines, sender, self._quantized(stream, stats), stats)
        finally:
            # Peers block in the export's collectives until the source has pulled every unit,
            # so a failed send still drains the stream: every rank then stops the same way.
            for _ in stream:
                pass
        return stats

    def _quantized(self, stream: Iterator, stats: SendStats) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            t0 = time.perf_counter()
            out = quantize_named(name, tensor, self.int4) if self.int4 else [(name, tensor)]
            stats.quantize_s += time.perf_counter() - t0
            if self.config.verify:
                stats.digests.update((n, sha256(t)) for n, t in out)
            yield from out

    def _send(self, engines, sender: Sender, named, stats: SendStats) -> None:
        in_flight: list[tuple[Ticket, list[tuple[Engine, Pending]]]] = []
        timeout = self.config.step_timeout_s

        def settle(ticket: Ticket, pendings: list[tuple[Engine, Pending]]) -> None:
            t0 = time.perf_counter()
            for engine, pending in pendings:
                try:
                    pending.wait(timeout)
                except Exception as e:
                    stats.engine_errors[engine.name] = f"{type(e).__name__}: {e}"
                    raise RuntimeError(
                        f"engine {engine.name!r} failed on bucket {ticket.bucket_index}: {e}"
                    ) from e
            sender.acknowledge(ticket)
            stats.engine_load_s += time.perf_counter() - t0

        def on_sent(bucket: Bucket, ticket: Ticket) -> None:
            in_flight.append((ticket, [(e, e.update_bucket(bucket, ticket)) for e in engines]))
            if len(in_flight) > 1:  # keep one bucket in flight while the next is prepared
                settle(*in_flight.pop(0))

        t0 = time.perf_counter()
        try:
            send_stream(sender, self.plan, named, on_sent)
            while in_flight:
                settle(*in_flight.pop(0))
        except Exception as e:
            blame = _engine_failures([p for _, pendings in in_flight for p in pendings])
            if not blame:
                raise
            # A transport error ("connection closed by peer") hides which engine broke it.
            raise RuntimeError(f"{blame}; transport: {type(e).__name__}: {e}") from e
        busy = time.perf_counter() - t0
        stats.transfer_s = max(0.0, busy - stats.export_s - stats.quantize_s - stats.engine_load_s)


def _engine_failures(pendings: list[tuple[Engine, Pending]], grace_s: float = 1.0) -> str:
    """The engines whose bucket request failed (their refusal usually explains the error)."""
    failed = []
    for engine, pending in pendings:
        try:
            pending.wait(grace_s)
        except TimeoutError:
            failed.append(f"engine {engine.name!r}: no acknowledgement")
        except Exception as e:  # noqa: BLE001 - collected into the one error raised
            failed.append(f"engine {engine.name!r} failed: {e}")
    return "; ".join(failed)


def _timed(stream: Iterator, stats: SendStats) -> Iterator:
    """The export generator, with the time spent inside it (gathers) added to export_s."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(stream)
        except StopIteration:
            stats.export_s += time.perf_counter() - t0
            return
        stats.export_s += time.perf_counter() - t0
        yield item
