"""The trainer side of one weight update: plan, check, export, quantize, send.

Runs on every rank of the trainer job (the export is a collective); only the exporter's source
rank (global rank 0) holds engines and a transport sender::

    ws = WeightSender(model_chunks, hf_config, sync_config, int4_config)
    ws.prepare(engines)                # all ranks, BEFORE any engine is paused: plan, identical
                                       # on every rank; finite weights; engines accept the plan
    ws.stage()                         # all ranks: export + int4 of the leading units that fit
                                       # in SyncConfig.stage_bytes, held until the send
    ... the driver (WeightSync) pauses, flushes and opens the engines' update sessions ...
    stats = ws.send(engines, sender)   # all ranks: [staged +] export -> int4 -> buckets

Bucket k+1 is exported, quantized and copied while bucket k is on the wire and being loaded:
the acknowledgement of bucket k is awaited only after bucket k+1 has been handed off. What was
staged before the pause costs trainer memory (``stage_bytes``) but no pause time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from weightsync.config import SyncConfig
from weightsync.engines.base import DataPlane, EngineFailed, Pending
from weightsync.plan import Bucket, Plan, TensorMeta, build_plan
from weightsync.plan_checks import check_plan_identical
from weightsync.probe import INT4_PARTS
from weightsync.proof import Probe, fingerprint_columns, fingerprints, probed
from weightsync.quant import Int4Config, packed_meta, quantize_named
from weightsync.tensors import all_finite
from weightsync.transport.base import Sender, Ticket, send_stream


@dataclass
class SendStats:
    """Seconds spent in each stage on the source rank (stages overlap: see module doc); what
    ``WeightSync`` gets back from the trainer job, typed, across Ray."""

    export_s: float = 0.0
    quantize_s: float = 0.0
    transfer_s: float = 0.0
    engine_load_s: float = 0.0
    staged_s: float = 0.0
    """Export + int4 done before the pause (``stage``); also counted in export_s/quantize_s."""
    staged_bytes: int = 0
    nbytes: int = 0
    num_buckets: int = 0
    apply_s: float = 0.0
    """Engine-side staging: the engines' load from their staging areas, in the pause."""
    probe_s: float = 0.0
    """Fingerprinting what was sent (``SyncConfig.verify``), on the source rank."""
    digests: dict[str, str] = field(default_factory=dict)
    """Fingerprint of every weight sent, HF names, aliases included (``SyncConfig.verify``;
    ``weightsync.proof``), to compare with what the engines' kernels read back."""
    verify_s: float = 0.0
    """Filled in by the driver: completeness, the engines' read-back and the comparison."""
    unverified: list[str] = field(default_factory=list)
    """Engines nothing could be read back from (the driver fills it in)."""
    rank_bytes: dict[str, list[int]] = field(default_factory=dict)
    """``SyncConfig.sharded``: bytes each engine rank received, by engine (empty otherwise)."""


def plan_metas(hf_metas: Iterable[Any], int4: Int4Config | None) -> list[TensorMeta]:
    """Exporter metadata -> what the engines receive (int4 packing applied), unit by unit."""
    return [
        TensorMeta(name, dtype, shape, m.unit)
        for m in hf_metas
        for name, shape, dtype in packed_meta(m.name, tuple(m.shape), m.dtype, int4)
    ]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _on_every_rank(bad: list[str]) -> list[str]:
    """Every rank's findings, on every rank: all of them raise, none enters the export."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, bad)
        bad = [b for rank_bad in everyone for b in rank_bad]
    return bad


def check_finite(model_chunks: Sequence[torch.nn.Module]) -> None:
    """ValueError on EVERY rank if any rank holds a NaN/Inf parameter shard (names them)."""
    bad = _on_every_rank(
        [
            f"rank {_rank()}: {name}"
            for chunk in model_chunks
            for name, p in chunk.named_parameters()
            if not all_finite(p)
        ]
    )
    if bad:
        raise ValueError(f"non-finite weights (NaN/Inf), nothing was sent: {bad[:5]}")


def check_shapes(model_chunks: Sequence[torch.nn.Module], hf_config: Any) -> None:
    """ValueError on EVERY rank if any rank's shards do not fit ``hf_config`` (names them)."""
    from megatron_bridge import check_local_shapes

    try:
        check_local_shapes(model_chunks, hf_config)
        mine = []
    except ValueError as e:
        mine = [f"rank {_rank()}: {e}"]
    bad = _on_every_rank(mine)
    if bad:
        raise ValueError(f"trainer shards do not match the model config: {bad[:3]}")


def check_model(
    model_chunks: Sequence[torch.nn.Module], hf_config: Any, plan: Plan, engines: Sequence[Any]
) -> None:
    """All ranks, before any pause: the local shards fit the config, hold only finite values,
    and every engine accepts the plan's names, shapes and dtypes."""
    check_shapes(model_chunks, hf_config)
    check_finite(model_chunks)
    for engine in engines:
        engine.validate(plan)


def by_source(aliases: dict[str, str] | None) -> dict[str, list[str]]:
    """``{alias: checkpoint name}`` (names the engines also compute with, a tied head) turned
    around: the aliases of each checkpoint name, fingerprinted as it is."""
    out: dict[str, list[str]] = {}
    for alias, source in (aliases or {}).items():
        out.setdefault(source, []).append(alias)
    return out


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
        self._metas: list[TensorMeta] = []
        self._units: Iterator | None = None  # the open export, between stage and send
        self._staged: list[tuple[str, torch.Tensor]] = []
        self._stats = SendStats()
        self.probe: Probe | None = None
        """What ``verify`` reads this update (``weightsync.proof``); None: nothing."""
        self._aliases: dict[str, list[str]] = {}  # checkpoint name -> the engines' aliases
        self._hashing = Hashing(None)
        self._unprobed: list[tuple[str, list]] | None = None  # stage_all: hashed at send

    @property
    def is_source(self) -> bool:
        from megatron_bridge import EXPORT_SOURCE_RANK

        return not dist.is_initialized() or dist.get_rank() == EXPORT_SOURCE_RANK

    def prepare(
        self,
        engines: Sequence[DataPlane] = (),
        probe: Probe | None = None,
        aliases: dict[str, str] | None = None,
    ) -> Plan:
        """Everything that can fail on bad input, done before any engine is paused.
        ``probe``: fingerprint what is sent for verify; ``aliases``: names the engines also
        compute with, ``{alias: checkpoint name}`` (a tied head), fingerprinted too."""
        from megatron_bridge import hf_weight_metadata

        self.probe = probe
        self._hashing.close()  # an update that failed before its send collected them
        self._hashing = Hashing(probe, deferred=probe is not None and probe.level == "sample")
        self._aliases = by_source(aliases)
        self.drop_staged()  # an update that failed between stage and send
        metas = plan_metas(hf_weight_metadata(self.model_chunks, self.hf_config), self.int4)
        plan = build_plan(metas, self.config.bucket_bytes)
        if dist.is_initialized() and dist.get_world_size() > 1:
            check_plan_identical(plan)
        check_model(self.model_chunks, self.hf_config, plan, engines)
        self.plan, self._metas = plan, metas
        return plan

    def stage(self, budget_bytes: int | None = None) -> int:
        """All ranks, after ``prepare`` and before the pause: open the export and run it (and
        int4) over the leading units whose bytes fit in ``budget_bytes`` (default
        ``SyncConfig.stage_bytes``), holding the result for ``send``. Every rank counts the
        same units from the identical plan, so the collectives stay in step. Returns the
        staged bytes."""
        assert self.plan is not None, "prepare() first"
        self.drop_staged()
        return self._stage(self.config.stage_bytes if budget_bytes is None else budget_bytes)

    def _stage(self, budget: int) -> int:
        from megatron_bridge import iter_hf_units

        assert self.plan is not None
        num_units, nbytes = _leading_units(self._metas, budget)
        self._stats = SendStats(nbytes=self.plan.total_nbytes, num_buckets=len(self.plan.buckets))
        self._stats.staged_bytes = nbytes
        units = iter_hf_units(self.model_chunks, self.hf_config, every_rank=True)
        self._units = _timed(units, self._stats)
        t0 = time.perf_counter()
        named = _flatten(itertools.islice(self._units, num_units))
        self._staged = list(self._quantized(named, self._stats))
        self._stats.staged_s = time.perf_counter() - t0
        return nbytes

    def stage_all(self) -> int:
        """All ranks, for a push in the background (``update_async``): the whole export
        staged and its stream run to the end, so the push runs no collective beside the
        trainer's next step. What shares memory with a parameter is copied (the next step
        changes it in place). Only the source rank keeps the result. Returns its bytes."""
        assert self.plan is not None, "prepare() first"
        self.drop_staged()
        # The fingerprints' column copies wait for the push (its thread, not the trainer's).
        self._unprobed = []
        try:
            nbytes = self._stage(self.plan.total_nbytes)
        finally:
            unprobed, self._unprobed = self._unprobed, None
        assert self._units is not None
        left = sum(1 for _ in _flatten(self._units))  # ends the export's generators
        assert left == 0, f"{left} tensors past the plan's units"
        self._units = iter([])
        if not self.is_source:
            self._staged = []
            return nbytes
        # Storage base pointers: a view into a parameter (a slice of a fused one) counts too.
        # Buffers too: a router's expert bias is exported as it is and updated in place.
        live = [t for c in self.model_chunks for t in itertools.chain(c.parameters(), c.buffers())]
        params = {t.untyped_storage().data_ptr() for t in live}
        copies: dict[int, torch.Tensor] = {}

        def own(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                return t
            return copies.setdefault(id(t), t.clone())

        self._staged = [(n, own(t)) for n, t in self._staged]
        self._unprobed = [(name, [(n, own(t)) for n, t in out]) for name, out in unprobed]
        return nbytes

    def drop_staged(self) -> None:
        """Let go of what was staged (an update that failed before its send). Every rank
        stops the open export at the same unit: no collective is left half-done."""
        close = getattr(self._units, "close", None)
        if close is not None:
            close()
        self._units, self._staged, self._unprobed = None, [], None

    def send(
        self, engines: Sequence[DataPlane], sender: Sender | None, stage_bound: int = 0
    ) -> SendStats:
        """Stream the model to ``engines`` (source rank) or take part in the export (others).
        ``stage_bound`` > 0: into each engine's staging area, the model untouched, refused
        past that many bytes (engine-side staging, the driver's
        ``SyncConfig.engine_stage_bytes``; the engines apply it in the pause)."""
        assert self.plan is not None, "prepare() first"
        if self._units is None:
            self.stage(0)  # nothing staged: the whole export runs now
        stats, staged, units = self._stats, self._staged, self._units
        self._units, self._staged = None, []
        rest = _flatten(units)
        if not self.is_source:
            for _ in rest:
                pass
            return stats
        assert sender is not None, "the source rank needs a transport sender"
        try:
            self._probe_staged(stats)
            named = itertools.chain(_drain(staged), self._quantized(rest, stats))
            if stage_bound:  # refused here, before anything moves, by an engine that cannot
                for engine in engines:  # hold it
                    engine.open_staging(self.plan.total_nbytes, stage_bound)
            self._send(engines, sender, named, stats, stage_bound > 0)
            stats.digests.update(self._hashing.collect())
        finally:
            # Peers block in the export's collectives until the source has pulled every unit,
            # so a failed send still drains the stream: every rank then stops the same way.
            for _ in rest:
                pass
        return stats

    def _quantized(self, stream: Iterator, stats: SendStats) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            t0 = time.perf_counter()
            out = quantize_named(name, tensor, self.int4) if self.int4 else [(name, tensor)]
            stats.quantize_s += time.perf_counter() - t0
            if self._unprobed is not None:
                self._unprobed.append((name, out))
            elif self.probe is not None and self.is_source:
                self._fingerprint(name, out, stats)
            yield from out

    def _probe_staged(self, stats: SendStats) -> None:
        """The fingerprints ``stage_all`` left for the push, taken now."""
        unprobed, self._unprobed = self._unprobed or [], None
        if self.probe is None or not self.is_source:
            return
        for name, out in unprobed:
            self._fingerprint(name, out, stats)

    def _fingerprint(self, name: str, out: list, stats: SendStats) -> None:
        """Hand the weight ``out`` (its sent tensors) to the hashing, under its name and
        every alias the engines compute with."""
        t0 = time.perf_counter()
        for as_name in [name, *self._aliases.get(name, [])]:
            self._hashing.submit(as_name, *self._probed(out, as_name))
        stats.probe_s += time.perf_counter() - t0

    def _probed(self, sent: list, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What is fingerprinted of the weight the engine will compute with (``proof.probed``);
        int4: dequantized from the packed bytes that were sent."""
        assert self.probe is not None
        if len(sent) == 1:
            return probed(sent[0][1], self.probe, name)
        assert self.int4 is not None
        parts = {n.rpartition(".")[2]: t for n, t in sent if n.rpartition(".")[2] in INT4_PARTS}
        return probed(parts, self.probe, name, self.int4.group_size, self.int4.symmetric)

    def _send(self, engines, sender: Sender, named, stats: SendStats, stage: bool) -> None:
        in_flight: list[tuple[Ticket, list[tuple[DataPlane, Pending]]]] = []
        timeout = self.config.step_timeout_s

        def settle(ticket: Ticket, pendings: list[tuple[DataPlane, Pending]]) -> None:
            t0 = time.perf_counter()
            try:
                _await_all(pendings, timeout)
            except EngineFailed as f:
                raise EngineFailed(f.engines, f"bucket {ticket.bucket_index}: {f}") from f.__cause__
            sender.acknowledge(ticket)
            stats.engine_load_s += time.perf_counter() - t0

        def on_sent(bucket: Bucket, ticket: Ticket) -> None:
            following = self.plan.buckets[bucket.index + 1 : bucket.index + 2]
            ticket = replace(ticket, next_nbytes=following[0].nbytes if following else 0)
            calls = [(e, e.stage_bucket if stage else e.update_bucket) for e in engines]
            in_flight.append((ticket, [(e, call(bucket, ticket)) for e, call in calls]))
            if len(in_flight) > 1:  # keep one bucket in flight while the next is prepared
                settle(*in_flight.pop(0))

        t0 = time.perf_counter()
        before = stats.export_s + stats.quantize_s  # what staging spent, outside this window
        try:
            send_stream(sender, self.plan, named, on_sent, flush=False)
            while in_flight:
                settle(*in_flight.pop(0))
            sender.flush()  # every engine answered, so delivery is done: returns at once
        except Exception as e:
            failed = _engine_failures([p for _, pendings in in_flight for p in pendings])
            if not failed:
                raise
            # A transport error ("connection closed by peer") hides which engine broke it.
            why = "; ".join(failed.values())
            raise EngineFailed(tuple(failed), f"{why}; transport: {type(e).__name__}: {e}") from e
        busy = time.perf_counter() - t0
        prepared = stats.export_s + stats.quantize_s - before
        stats.transfer_s = max(0.0, busy - prepared - stats.engine_load_s)


def _await_all(
    pendings: list[tuple[DataPlane, Pending]], timeout_s: float, poll_s: float = 0.005
) -> None:
    """Wait for every engine's answer to one bucket, round robin, and raise the first failure
    as soon as it arrives: not after the other engines' deadlines, as their receive may wait
    on a broadcast that the failed engine will never join."""
    deadline = time.monotonic() + timeout_s
    waiting = list(pendings)
    while waiting:
        engine, pending = waiting.pop(0)
        left = max(deadline - time.monotonic(), 0.0)
        last = not waiting
        try:
            pending.wait(left if last else min(left, poll_s))
        except Exception as e:
            if last or left == 0.0 or pending.done():  # else: not answered yet
                raise EngineFailed((engine.name,), f"engine {engine.name!r} failed: {e}") from e
            waiting.append((engine, pending))


def _engine_failures(
    pendings: list[tuple[DataPlane, Pending]], grace_s: float = 1.0
) -> dict[str, str]:
    """The engines whose bucket request failed, each with why (their refusal usually
    explains the transport's error)."""
    failed = {}
    for engine, pending in pendings:
        try:
            pending.wait(grace_s)
        except TimeoutError:
            failed[engine.name] = f"engine {engine.name!r}: no acknowledgement"
        except Exception as e:  # noqa: BLE001 - collected into the one error raised
            failed[engine.name] = f"engine {engine.name!r} failed: {e}"
    return failed


def _leading_units(metas: Sequence[TensorMeta], budget: int) -> tuple[int, int]:
    """How many leading units of the stream fit in ``budget`` bytes, and their bytes."""
    sizes: list[int] = []
    for prev, m in zip([None, *metas], metas, strict=False):
        if prev is None or m.unit != prev.unit:
            sizes.append(0)
        sizes[-1] += math.prod(m.shape) * m.dtype.itemsize
    total = 0
    for count, size in enumerate(sizes):
        if total + size > budget:
            return count, total
        total += size
    return len(sizes), total


def _flatten(units: Iterable[list]) -> Iterator[tuple[str, torch.Tensor]]:
    for unit in units:
        yield from _drain(unit)


def _drain(items: list) -> Iterator:
    """Yield a list's items front to back, dropping each reference as it goes."""
    items.reverse()
    while items:
        yield items.pop()


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


class Hashing:
    """The fingerprints of what is sent (``weightsync.proof``). At level sample each weight's
    probed columns are a small copy, kept until the send is over and then hashed all at once
    in groups (``proof.fingerprints``: milliseconds, and no thread contending with the send's
    for the GIL); at level full (the whole weight would have to be kept) each is hashed in
    line."""

    def __init__(self, probe: Probe | None, deferred: bool = False) -> None:
        self.probe = probe
        self.deferred = deferred
        self._taken: list[tuple[str, torch.Tensor, torch.Tensor, int]] = []
        self._done: dict[str, str] = {}

    def submit(self, name: str, w_RC: torch.Tensor, cols: torch.Tensor, width: int) -> None:
        assert self.probe is not None
        if self.deferred:
            self._taken.append((name, w_RC, cols, width))
        else:
            self._done[name] = fingerprint_columns(w_RC, cols, width, self.probe, name)

    def close(self) -> None:
        """Drop what is pending (a failed update)."""
        self._taken, self._done = [], {}

    def collect(self) -> dict[str, str]:
        """Every fingerprint submitted."""
        out = dict(self._done)
        if self._taken:
            assert self.probe is not None
            out.update(fingerprints(self._taken, self.probe))
        self.close()
        return out
