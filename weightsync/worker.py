"""The steps ``WeightSync`` runs inside the trainer workers (``fn(worker, ...)`` on every rank).

State lives on the worker object (``worker.weightsync[sync_id]``, one per ``WeightSync``) for
the lifetime of the job: the
``WeightSender`` on every rank; on the source rank also the engines' data planes
(``engines.base.DataPlane``) and the transport sender. The source rank sets up the transport
with the engines itself (``connect``): the driver never sees a group, a ring or a port. The
worker provides ``model_chunks`` and ``hf_config``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from weightsync.config import LoraSync, SyncConfig
from weightsync.engines.base import BroadcastLink, DataPlane, ShmLink
from weightsync.engines.spec import EngineSpec
from weightsync.lora import check_root
from weightsync.net import free_port, is_loopback, node_address
from weightsync.proof import Probe
from weightsync.quant import Int4Config
from weightsync.sender import SendStats, WeightSender

GROUP_NAME = "weight_update_group"


@dataclass
class _State:
    sender: WeightSender  # or sharded_sender.ShardedSender (SyncConfig.sharded)
    specs: list[EngineSpec]
    config: SyncConfig
    engines: list[DataPlane] = field(default_factory=list)
    transport: Any = None
    group: Any = None
    ring: Any = None


def _state(worker: Any, sync_id: str) -> _State:
    state = getattr(worker, "weightsync", {}).get(sync_id)
    if state is None:
        raise RuntimeError("weightsync is not installed on this worker (WeightSync.connect)")
    return state


def _group_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _ranks(specs: Sequence[EngineSpec], first: int) -> tuple[int, list[int]]:
    """Ranks (or ring consumers) every engine's workers take from ``first`` on: the total
    after them, and each engine's first. An engine takes one per TP rank."""
    offsets, n = [], first
    for s in specs:
        offsets.append(n)
        n += s.tp_size
    return n, offsets


class TrainerSync:
    """Namespace of the worker-side steps (static, so Ray pickles them by reference)."""

    @staticmethod
    def install(
        worker: Any,
        sync_id: str,
        specs: Sequence[EngineSpec],
        config: SyncConfig,
        int4: Int4Config | None,
    ) -> None:
        """State for the WeightSync ``sync_id``: several (fleets with their own transports)
        can drive one trainer job side by side."""
        TrainerSync.uninstall(worker, sync_id)  # a reconnect replaces the state
        if config.sharded:
            from weightsync.sharded_sender import ShardedSender

            sender = ShardedSender(worker.model_chunks, worker.hf_config, config, int4, specs)
        else:
            sender = WeightSender(worker.model_chunks, worker.hf_config, config, int4)
        state = _State(sender=sender, specs=list(specs), config=config)
        if sender.is_source and config.lora is not None:
            # Where adapters will be written is ours alone, or refused now, before any pause
            # or engine call (no collective here: the other ranks cannot be left waiting).
            check_root(config.lora)
        if sender.is_source:
            state.engines = [s.connect(config) for s in specs]
        if not hasattr(worker, "weightsync"):
            worker.weightsync = {}
        worker.weightsync[sync_id] = state

    @staticmethod
    def model_summary(worker: Any, sync_id: str) -> dict:
        """The trainer model's config fields every engine must share (``model_config``)."""
        from weightsync.model_config import summary

        sender = _state(worker, sync_id).sender
        qc = sender.int4.to_quantization_config() if sender.int4 else {}
        return summary(worker.hf_config, qc)

    @staticmethod
    def connect(worker: Any, sync_id: str) -> None:
        """All ranks: the transport between the source rank and every engine rank, built
        from the source rank (it hosts the group's store or owns the ring)."""
        state = _state(worker, sync_id)
        if state.config.sharded:
            from weightsync.sharded_sender import open_sharded

            loopback = all(is_loopback(s.url) for s in state.specs)
            open_sharded(state, GROUP_NAME, node_address(loopback))
        elif state.config.transport == "ipc":
            _open_shm(state)
        elif state.sender.is_source:
            _open_broadcast(state)

    @staticmethod
    def prepare(
        worker: Any,
        sync_id: str,
        probe: Probe | None = None,
        aliases: dict | None = None,
        background: bool = False,
    ) -> dict[str, int]:
        """The plan (checked), and the first ``stage_bytes`` staged (``background``: all of
        it, for ``update_async``). Returns what the plan sends, ``{tensor name: elements}``:
        every engine rank must load all of it."""
        state = _state(worker, sync_id)
        plan = state.sender.prepare(state.engines, probe, aliases)
        if background:
            state.sender.stage_all()
        else:
            state.sender.stage()  # SyncConfig.stage_bytes of export + int4, before the pause
        return {s.name: s.numel for b in plan.buckets for g in b.groups for s in g.entries}

    @staticmethod
    def send(worker: Any, sync_id: str, stage_bound: int = 0) -> SendStats:
        state = _state(worker, sync_id)
        return state.sender.send(state.engines, state.transport, stage_bound)

    @staticmethod
    def publish_adapter(
        worker: Any,
        sync_id: str,
        lora: LoraSync,
        version: int,
        live: Sequence[str],
        loaded: Sequence[str] = (),
        seed: int | None = None,
    ) -> dict | None:
        """All ranks (the export is collective): the LoRA adapter the worker trains
        (``worker.lora_spec``, from ``megatron_bridge.apply_lora``). The source rank hands it
        to the ``live`` engines that load adapters from memory (each one's error is
        returned, not raised: the driver keeps all or none) and, when any other engine is
        live, writes it for them (``weightsync.lora``; directories of other versions than it
        and the ``loaded`` ones are removed). It returns where, which engines took it from
        memory, its size, timings and, with a ``seed``, the probe digests verify compares the
        engines' slots with. A non-finite tensor is refused by name before any engine sees it."""
        from megatron_bridge import adapter_config, export_lora
        from weightsync.lora import adapter_digests, prune, write_adapter
        from weightsync.tensors import all_finite

        spec = getattr(worker, "lora_spec", None)
        if spec is None:
            raise ValueError("the trainer worker has no lora_spec (megatron_bridge.apply_lora)")
        t0 = time.perf_counter()
        chunks, hf = worker.model_chunks, worker.hf_config
        tensors = {n: t.detach().cpu().clone() for n, t in export_lora(chunks, hf, spec)}
        state = _state(worker, sync_id)
        if not state.sender.is_source:
            return None
        bad = [n for n, t in tensors.items() if not all_finite(t)]
        if bad:
            raise ValueError(f"adapter tensors with NaN/Inf: {bad[:5]}")
        t1 = time.perf_counter()
        served, config = lora.served_name(version), adapter_config(spec)
        memory = {
            s.label: plane
            for s, plane in zip(state.specs, state.engines, strict=True)
            if s.label in live and hasattr(plane, "load_adapter_tensors")
        }
        path = None
        if set(live) - set(memory):  # some engine reads it from disk
            path = lora.path(sync_id, served)
            write_adapter(path, tensors, config)
            prune(path.parent, lora.name, {path.name, *loaded})
        errors = _load_in_memory(memory, served, tensors, config)
        t2 = time.perf_counter()
        return {
            "path": None if path is None else str(path),
            "in_memory": sorted(memory),
            "errors": errors,
            "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "export_s": t1 - t0,
            "write_s": t2 - t1,
            "digests": {} if seed is None else adapter_digests(tensors, config, seed),
            "probe_s": time.perf_counter() - t2,
        }

    @staticmethod
    def remove_adapters(worker: Any, sync_id: str, lora: LoraSync, names: Sequence[str]) -> None:
        """Source rank: the directories of adapters no engine holds any more."""
        from weightsync.lora import remove_adapter

        if _state(worker, sync_id).sender.is_source:
            for name in names:
                remove_adapter(lora.path(sync_id, name))

    @staticmethod
    def reset(worker: Any, sync_id: str) -> None:
        """Drop the transport (group, ring, sender), keep the rest: the next connect rebuilds
        it. Best effort, as a peer of the group may be gone."""
        state = getattr(worker, "weightsync", {}).get(sync_id)
        if state is None:
            return
        # The sender is dropped, not closed: a broadcast sender's close() flushes, which would
        # wait on a dead peer; a ring's slots may still be held by a consumer that died.
        ring, group = state.ring, state.group
        state.transport = state.ring = state.group = None
        state.sender.drop_staged()  # a whole staged model (update_async) is not kept
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.close()
        if group is not None:
            from weightsync.transport.broadcast import destroy_weight_group

            with contextlib.suppress(Exception):
                destroy_weight_group(group)

    @staticmethod
    def uninstall(worker: Any, sync_id: str) -> None:
        state = getattr(worker, "weightsync", {}).get(sync_id)
        if state is None:
            return
        TrainerSync.reset(worker, sync_id)
        for engine in state.engines:
            engine.close()
        if state.config.lora is not None and state.sender.is_source:
            from weightsync.lora import remove_adapter

            remove_adapter(Path(state.config.lora.root) / sync_id)
        del worker.weightsync[sync_id]


def _open_broadcast(state: _State) -> None:
    """Source rank: host the weight group and have every engine join it at its rank offset.
    The joins complete only together with the host's own, so they run side by side; an
    engine that refuses fails the set-up at once, not at the store's deadline. Each
    connection gets a group name of its own: a group that still forms after a failed set-up
    (a join that outlived its caller) can never block the next one's name."""
    from weightsync.transport.broadcast import BroadcastSender, init_weight_group

    timeout = state.config.step_timeout_s
    backend = _group_backend()
    address = node_address(all(is_loopback(s.url) for s in state.specs))
    port = free_port("")  # engines on other hosts connect to it
    name = f"{GROUP_NAME}-{uuid.uuid4().hex[:8]}"
    world, offsets = _ranks(state.specs, first=1)  # the source rank is rank 0
    links = [
        BroadcastLink(
            master_address=address,
            master_port=port,
            world_size=world,
            rank_offset=off,
            group_name=name,
            backend=backend,
        )
        for off in offsets
    ]
    pairs = list(zip(state.engines, links, strict=True))
    for engine, link in pairs:  # every engine accepts its link before any of them joins
        engine.check_link(link)
    joins = [engine.join(link) for engine, link in pairs]

    def host() -> None:
        # Kept even when it forms after the set-up gave up: reset() then destroys it.
        state.group = init_weight_group(
            address, port, world, 0, name, backend=backend, timeout_s=timeout
        )

    pool = ThreadPoolExecutor(len(joins) + 1, thread_name_prefix="join")
    hosting = pool.submit(host)
    waits = [pool.submit(j.wait, timeout) for j in joins]
    pool.shutdown(wait=False)
    done, pending = wait([hosting, *waits], timeout=timeout, return_when=FIRST_EXCEPTION)
    for f in done:
        if f.exception() is not None:
            raise f.exception()
    if pending:
        raise TimeoutError(f"broadcast group set-up not done within {timeout:.0f} s")
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    state.transport = BroadcastSender(state.group, device=device, timeout_s=timeout)


def _open_shm(state: _State) -> None:
    """All ranks plan (a collective: the ring's slot size is the largest bucket); the source
    rank creates the ring, has every engine map it (one consumer per engine rank) and then
    unlinks its names."""
    from weightsync.transport.shm import ShmRing, ShmSender

    plan = state.sender.prepare()
    if not state.sender.is_source:
        return
    consumers, offsets = _ranks(state.specs, first=0)
    state.ring = ShmRing.create(plan.max_bucket_nbytes, num_slots=2, num_consumers=consumers)
    timeout = state.config.step_timeout_s
    deadline = time.monotonic() + timeout  # one for the whole set-up, as the driver waits
    links = [
        (engine, ShmLink(ring=state.ring.spec, consumer_index=off))
        for engine, off in zip(state.engines, offsets, strict=True)
    ]
    for engine, link in links:
        engine.check_link(link)
    joins = [engine.join(link) for engine, link in links]
    for join in joins:
        join.wait(max(deadline - time.monotonic(), 0.0))
    # Every rank of every engine has mapped the ring: the names can leave /dev/shm.
    state.ring.unlink()
    state.transport = ShmSender(state.ring, timeout_s=timeout)


def _load_in_memory(
    planes: dict[str, DataPlane], name: str, tensors: dict[str, torch.Tensor], config: dict
) -> dict[str, str]:
    """Adapter ``name`` into every engine of ``planes`` at once; each failure by engine."""
    if not planes:
        return {}
    with ThreadPoolExecutor(len(planes), thread_name_prefix="wsync-lora") as pool:
        futures = {
            label: pool.submit(plane.load_adapter_tensors, name, tensors, config)
            for label, plane in planes.items()
        }
    return {
        label: f"engine {label!r}: {f.exception()}"
        for label, f in futures.items()
        if f.exception() is not None
    }
