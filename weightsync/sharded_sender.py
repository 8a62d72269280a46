"""``SyncConfig.sharded``: every trainer rank sends its own slices, every engine rank receives
only what it serves (``weightsync.reshard``, ``weightsync.shard_transfer``); the trainer-side
counterpart of ``sender.WeightSender`` (same steps, same checks, no gather).

Every trainer rank is in the weight group (ranks 0..T-1, engines after them). The source
rank drives the engines: it queues every round's ``/update_weights`` on each engine (one
thread per engine keeps them in order) and then sends its own slices like every other rank.
verify's expected fingerprints are hashed where the slices lie (``weightsync.shard_proof``)
and gathered on the source rank: no rank ever holds a whole tensor.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from weightsync.config import SyncConfig
from weightsync.engine_shards import EngineLayout, ModelShape
from weightsync.engines.base import BroadcastLink, DataPlane
from weightsync.engines.spec import EngineSpec
from weightsync.plan import Plan, build_plan
from weightsync.proof import Probe
from weightsync.quant import Int4Config
from weightsync.reshard import ReshardPlan, plan_reshard
from weightsync.sender import SendStats, by_source, check_model, plan_metas
from weightsync.shard_transfer import Tensors, engine_rounds, send_slices


class ShardedSender:
    def __init__(
        self,
        model_chunks: Sequence[torch.nn.Module],
        hf_config: Any,
        config: SyncConfig,
        int4: Int4Config | None,
        specs: Sequence[EngineSpec],
    ) -> None:
        if torch.cuda.is_available():  # the same on every rank: all of them refuse together
            raise ValueError(
                "SyncConfig.sharded runs over gloo from CPU trainers (vLLM's plugin joins with "
                "gloo); not yet from CUDA trainers"
            )
        self.model_chunks, self.hf_config = list(model_chunks), hf_config
        self.config, self.int4, self.specs = config, int4, list(specs)
        self.plan: Plan | None = None
        self.reshard: ReshardPlan | None = None
        self.probe: Probe | None = None
        self._holdings: list = []
        self._tensors: Tensors | None = None
        self._aliases: dict[str, list[str]] = {}

    @property
    def is_source(self) -> bool:
        from megatron_bridge import EXPORT_SOURCE_RANK

        return dist.get_rank() == EXPORT_SOURCE_RANK

    def prepare(
        self,
        engines: Sequence[DataPlane] = (),
        probe: Probe | None = None,
        aliases: dict[str, str] | None = None,
    ) -> Plan:
        """The reshard plan and every check ``WeightSender.prepare`` runs, before any pause.
        Returns the bucket plan of the whole model: the names, shapes and dtypes every
        engine must accept and load (completeness), not how the bytes travel."""
        from megatron_bridge import hf_weight_metadata
        from megatron_bridge.holdings import live_holdings

        self.probe, self._aliases = probe, by_source(aliases)
        hf_metas = hf_weight_metadata(self.model_chunks, self.hf_config)
        plan = build_plan(plan_metas(hf_metas, self.int4), self.config.bucket_bytes)
        holdings = live_holdings(self.model_chunks, self.hf_config)
        itemsize = {m.name: m.dtype.itemsize for m in hf_metas}
        layouts = [EngineLayout(s.tp_size) for s in self.specs]
        model = ModelShape.of(self.hf_config)
        self.reshard = plan_reshard(holdings, itemsize, layouts, model, self.int4)
        _check_same_plan(self.reshard)
        shapes = {m.name: tuple(m.shape) for m in hf_metas}
        self._tensors = Tensors(shapes, {m.name: m.dtype for m in hf_metas}, self.int4)
        check_model(self.model_chunks, self.hf_config, plan, engines)
        self.plan, self._holdings = plan, holdings
        return plan

    def stage(self, budget_bytes: int | None = None) -> int:
        return 0  # nothing to export ahead: each rank reads its own shards in the send

    def stage_all(self) -> int:
        raise ValueError("update_async is not supported with SyncConfig.sharded yet: use update")

    def drop_staged(self) -> None:
        pass

    def send(self, engines: Sequence[DataPlane], group: Any, stage_bound: int = 0) -> SendStats:
        """All ranks: this rank's slices to the engine ranks; the source rank also drives the
        engines' rounds and returns the fingerprints of the whole update."""
        from megatron_bridge.holdings import shard_reader

        assert self.reshard is not None and self._tensors is not None, "prepare() first"
        if stage_bound:
            raise ValueError("engine-side staging is not supported with SyncConfig.sharded yet")
        stats = SendStats(nbytes=sum(self.reshard.sent.values()))
        read = shard_reader(self.model_chunks, self.hf_config, self._holdings)
        t0 = time.perf_counter()
        everyone = self._gather_parts(read)
        stats.probe_s = time.perf_counter() - t0
        bound, world = self.config.bucket_bytes, dist.get_world_size()
        # Every engine's rounds built before any is queued: a plan error queues nothing.
        infos = [engine_rounds(self.reshard, self._tensors, e, bound) for e in range(len(engines))]
        rounds = [
            (engine, engine.update_round(info))
            for engine, mine in zip(engines, infos, strict=True)
            for info in mine
        ]
        stats.num_buckets = len(rounds)
        t1 = time.perf_counter()
        if rounds:  # the source rank: its own slices beside the engines' rounds
            _send_watching(
                rounds,
                self.config.step_timeout_s,
                lambda: send_slices(
                    self.reshard, dist.get_rank(), read, self._tensors, group, world, bound
                ),
            )
        else:
            send_slices(self.reshard, dist.get_rank(), read, self._tensors, group, world, bound)
        stats.transfer_s = time.perf_counter() - t1
        stats.rank_bytes = {
            s.label: [self.reshard.served[(e, w)] for w in range(s.tp_size)]
            for e, s in enumerate(self.specs)
        }
        if self.is_source and self.probe is not None:
            from weightsync.shard_proof import expected

            stats.digests = expected(everyone)
        return stats

    def _gather_parts(self, read) -> list:
        """Every rank's proof parts; a rank that failed to hash sends its error instead, and
        then every rank raises it (none is left waiting in a collective)."""
        try:
            parts = self._proof_parts(read) if self.probe is not None else {}
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            parts = {"error": f"rank {dist.get_rank()}: {type(e).__name__}: {e}"}
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, parts)
        errors = [p["error"] for p in everyone if "error" in p]
        if errors:
            raise ValueError(f"verify's fingerprints of the trainer's slices: {errors[:3]}")
        return everyone

    def _proof_parts(self, read) -> dict[str, list[dict]]:
        """verify's parts of the slices this rank is the first holder of. An alias (a tied
        head) is read back by the engine under its own name, on its own sampled columns: its
        parts are hashed under that name too."""
        from weightsync.shard_proof import slice_part

        rank, out = dist.get_rank(), {}
        for h in self._holdings:
            if h.ranks[0] != rank:
                continue
            piece = read(h.name, h.box)
            for name in (h.name, *self._aliases.get(h.name, ())):
                part = slice_part(name, piece, h.box, h.shape, self.probe, self.int4)
                out.setdefault(name, []).append(part)
        return out


def _send_watching(rounds: list, timeout_s: float, send) -> None:
    """The source rank's ``send`` beside the engines' queued rounds: an engine that refuses a
    round fails the update at once, named, not at the transfer's deadline."""
    from concurrent.futures import ThreadPoolExecutor

    from weightsync.engines.base import EngineFailed

    pool = ThreadPoolExecutor(1, thread_name_prefix="wsync-shards")
    sending = pool.submit(send)
    pool.shutdown(wait=False)  # a send stuck on a failed engine ends with its group
    deadline = time.monotonic() + timeout_s
    pending = list(rounds)
    while pending or not sending.done():
        for engine, inflight in [r for r in pending if r[1].done()]:
            pending.remove((engine, inflight))
            try:
                inflight.wait(0)
            except Exception as e:  # the engine's own reason, named
                raise EngineFailed((engine.name,), f"engine {engine.name!r}: {e}") from e
        if sending.done():
            sending.result()  # this rank's own send failed
            if not pending:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"sharded transfer not done within {timeout_s:.0f} s")
        time.sleep(0.005)


def _join_beside(host, joins: list, timeout: float) -> None:
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(len(joins) + 1, thread_name_prefix="wsync-join")
    futures = [pool.submit(host), *(pool.submit(j.wait, timeout) for j in joins)]
    pool.shutdown(wait=False)
    done, pending = wait(futures, timeout=timeout, return_when=FIRST_EXCEPTION)
    for f in done:
        if f.exception() is not None:
            raise f.exception()
    if pending:
        raise TimeoutError(f"sharded weight group set-up not done within {timeout:.0f} s")


def _check_same_plan(plan: ReshardPlan) -> None:
    """Every trainer rank planned the same moves (each sends its own part of them): refused
    on every rank otherwise, before anything is paused."""
    import hashlib

    mine = hashlib.sha256(repr(plan.moves).encode()).hexdigest()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if differ:
        raise ValueError(f"trainer ranks {differ} planned other sharded moves than rank 0")


def open_sharded(state: Any, group_name: str, address: str) -> None:
    """All ranks: the weight group of every trainer rank and every engine rank. The source
    rank picks the rendezvous (at ``address`` when every engine is local, else its node's
    address) and has the engines join; every rank joins beside them."""
    import socket

    from weightsync.net import free_port, node_address
    from weightsync.transport.broadcast import init_weight_group

    timeout = state.config.step_timeout_s
    world, rank = dist.get_world_size(), dist.get_rank()
    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    where = [None]
    if state.sender.is_source:
        for engine in state.engines:
            if not hasattr(engine, "update_round"):
                raise ValueError(
                    f"engine {engine.name!r}: SyncConfig.sharded needs vLLM engines (SGLang's "
                    "API takes whole tensors)"
                )
        if len(set(hosts)) > 1:  # trainer ranks on other hosts reach the store too
            address = node_address(loopback=False)
        where = [(address, free_port(""), f"{group_name}-{uuid.uuid4().hex[:8]}")]
    dist.broadcast_object_list(where, src=0)
    address, port, name = where[0]
    total = world + sum(s.tp_size for s in state.specs)
    links = []
    if state.sender.is_source:
        offset = world
        for spec in state.specs:
            links.append(
                BroadcastLink(
                    master_address=address,
                    master_port=port,
                    world_size=total,
                    rank_offset=offset,
                    group_name=name,
                    backend="gloo",
                    sharded=True,
                    senders=world,
                )
            )
            offset += spec.tp_size
        for engine, link in zip(state.engines, links, strict=True):
            engine.check_link(link)  # every engine accepts its link before any joins
    joins = [engine.join(link) for engine, link in zip(state.engines, links, strict=True)]

    def host() -> None:
        state.group = init_weight_group(address, port, total, rank, name, timeout_s=timeout)

    if not joins:
        host()
    else:  # side by side: an engine that refuses to join fails the set-up at once, named
        _join_beside(host, joins, timeout)
    state.transport = state.group
