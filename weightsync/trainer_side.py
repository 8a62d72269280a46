"""What ``WeightSync`` runs inside the trainer workers (``fn(worker, ...)`` on every rank).

State lives on the worker object (``worker.weightsync``) for the lifetime of the job: the
``WeightSender`` on every rank; on the source rank also the engines' data-plane adapters and
the transport sender. The worker provides ``model_chunks`` and ``hf_config``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from weightsync.config import SyncConfig
from weightsync.engines.spec import EngineSpec, join_broadcast
from weightsync.quant import Int4Config
from weightsync.sync import WeightSender

if TYPE_CHECKING:
    from weightsync.orchestrator import WeightSync

GROUP_NAME = "weight_update_group"


@dataclass
class _State:
    sender: WeightSender
    specs: list[EngineSpec]
    engines: list[Any] = field(default_factory=list)
    transport: Any = None
    group: Any = None
    ring: Any = None


def _state(worker: Any) -> _State:
    state = getattr(worker, "weightsync", None)
    if state is None:
        raise RuntimeError("weightsync is not installed on this worker (WeightSync.connect)")
    return state


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


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


def _node_address(loopback: bool) -> str:
    # Engines on this host reach the store over loopback; only remote ones need the node IP.
    if loopback:
        return "127.0.0.1"
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


class TrainerSync:
    """Namespace of the worker-side steps (static, so Ray pickles them by reference)."""

    @staticmethod
    def install(
        worker: Any, specs: Sequence[EngineSpec], config: SyncConfig, int4: Int4Config | None
    ) -> None:
        TrainerSync.uninstall(worker)  # a reconnect after a failed update replaces the state
        sender = WeightSender(worker.model_chunks, worker.hf_config, config, int4)
        state = _State(sender=sender, specs=list(specs))
        if sender.is_source:
            state.engines = [s.connect(config) for s in specs]
        worker.weightsync = state

    @staticmethod
    def endpoint(worker: Any, loopback: bool) -> tuple[str, int, str] | None:
        """Source rank: where its weight group listens and which backend it will use."""
        if not _state(worker).sender.is_source:
            return None
        return _node_address(loopback), _free_port(), _group_backend()

    @staticmethod
    def open_broadcast(
        worker: Any, address: str, port: int, world_size: int, timeout_s: float
    ) -> None:
        from weightsync.transport.broadcast import BroadcastSender, init_weight_group

        state = _state(worker)
        if not state.sender.is_source:
            return
        backend = _group_backend()
        state.group = init_weight_group(
            address, port, world_size, 0, GROUP_NAME, backend=backend, timeout_s=timeout_s
        )
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        state.transport = BroadcastSender(state.group, device=device, timeout_s=timeout_s)

    @staticmethod
    def open_shm(worker: Any, num_consumers: int, timeout_s: float):
        from weightsync.transport.shm import ShmRing, ShmSender

        state = _state(worker)
        plan = state.sender.prepare()  # collective: every rank takes part
        if not state.sender.is_source:
            return None
        state.ring = ShmRing.create(
            plan.max_bucket_nbytes, num_slots=2, num_consumers=num_consumers
        )
        state.transport = ShmSender(state.ring, timeout_s=timeout_s)
        return state.ring.spec

    @staticmethod
    def model_summary(worker: Any) -> dict:
        """The trainer model's config fields every engine must share (``model_config``)."""
        from weightsync.model_config import summary

        sender = _state(worker).sender
        qc = sender.int4.to_quantization_config() if sender.int4 else {}
        return summary(worker.hf_config, qc)

    @staticmethod
    def prepare(worker: Any, probe_seed: int = 0) -> int:
        state = _state(worker)
        plan = state.sender.prepare(state.engines, probe_seed)
        state.sender.stage()  # SyncConfig.stage_bytes of export + int4, before the pause
        return plan.total_nbytes

    @staticmethod
    def send(worker: Any) -> dict:
        state = _state(worker)
        stats = state.sender.send(state.engines, state.transport)
        return stats.__dict__.copy()

    @staticmethod
    def reset(worker: Any) -> None:
        """Drop the transport (group, ring, sender), keep the rest: the next connect rebuilds
        it. Best effort, as a peer of the group may be gone."""
        state = getattr(worker, "weightsync", None)
        if state is None:
            return
        # The sender is dropped, not closed: a broadcast sender's close() flushes, which would
        # wait on a dead peer; a ring's slots may still be held by a consumer that died.
        ring, group = state.ring, state.group
        state.transport = state.ring = state.group = None
        if ring is not None:
            with contextlib.suppress(Exception):
                ring.close()
        if group is not None:
            from weightsync.transport.broadcast import destroy_weight_group

            with contextlib.suppress(Exception):
                destroy_weight_group(group)

    @staticmethod
    def uninstall(worker: Any) -> None:
        state = getattr(worker, "weightsync", None)
        if state is None:
            return
        TrainerSync.reset(worker)
        for engine in state.engines:
            engine.close()
        worker.weightsync = None

    @staticmethod
    def connect(ws: WeightSync) -> None:
        """Driver side of the transport set-up; the engines join beside the source rank."""
        timeout = ws.config.step_timeout_s
        if ws.config.transport == "broadcast":
            loopback = all(_is_loopback(s.url) for s in ws.specs)
            address, port, backend = next(e for e in ws._run(TrainerSync.endpoint, loopback) if e)
            vllm = [s.label for s in ws.specs if s.kind == "vllm"]
            if backend != "gloo" and vllm:
                raise ValueError(
                    f"the trainer's weight group uses {backend}, but the weightsync vLLM "
                    f"plugin joins with gloo (engines {vllm}): use transport='ipc' or "
                    "CPU trainers for vLLM engines"
                )
            world, offsets = _ranks(ws.specs, first=1)  # the source rank is rank 0
            pool = ThreadPoolExecutor(len(ws.specs) + 1, thread_name_prefix="join")
            joins = [
                pool.submit(
                    join_broadcast,
                    ws.engines[s.label],
                    s,
                    master_address=address,
                    master_port=port,
                    world_size=world,
                    rank_offset=off,
                    group_name=GROUP_NAME,
                    backend=backend,
                )
                for s, off in zip(ws.specs, offsets, strict=True)
            ]
            host = pool.submit(ws._run, TrainerSync.open_broadcast, address, port, world, timeout)
            pool.shutdown(wait=False)
            # An engine that refuses to join fails the set-up now, not at the store timeout.
            done, pending = wait([host, *joins], timeout=timeout, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()
            if pending:
                raise TimeoutError(f"broadcast group set-up not done within {timeout:.0f} s")
        elif ws.config.transport == "ipc":
            if any(s.kind != "vllm" for s in ws.specs):
                raise ValueError(
                    "transport='ipc' on CPU (shared memory) is wired for vLLM "
                    "engines; use 'broadcast' for SGLang"
                )
            # Every worker of an engine consumes every bucket: one consumer per engine rank.
            consumers, offsets = _ranks(ws.specs, first=0)
            spec = next(r for r in ws._run(TrainerSync.open_shm, consumers, timeout) if r)
            last = len(ws.specs) - 1
            for i, (s, off) in enumerate(zip(ws.specs, offsets, strict=True)):
                ws.engines[s.label].init_shm(spec, consumer_index=off, unlink=i == last)
        else:
            raise ValueError(
                f"transport={ws.config.transport!r} is not wired into WeightSync "
                "yet: use 'broadcast' or 'ipc'"
            )
