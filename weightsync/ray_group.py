"""A Megatron trainer worker group on Ray: N actors, one torch.distributed rank each.

::

    group = TrainerGroup.create(2, tp=2)                 # local Ray cluster if none is running
    sums = group.run_all(lambda w: w.rank * 10)          # fn(worker) on every rank, with a deadline
    group.shutdown()

``run_all`` is the one primitive the driver (WeightSync) needs to run a collective (export, sync) on
every rank: it gathers with a deadline and raises naming the rank that failed, carrying that
rank's traceback. ray is imported lazily so the rest of weightsync imports without it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from weightsync.config import DEFAULT_TIMEOUT_S
from weightsync.inflight import BACKGROUND_GROUP
from weightsync.net import free_port

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelSpec:
    """The megatron layout every rank initialises (world = tp * pp * dp)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    seed: int = 1234

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "ep"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be >= 1")


class TrainerWorker:
    """One rank. Subclass it to add model code; ``execute`` runs any ``fn(worker, ...)`` here.

    State the driver (WeightSync) reads: ``rank``, ``world_size``, ``model_chunks``, ``hf_config``,
    ``optimizer`` (the last three are set by whoever builds the model).
    """

    def __init__(self, **kwargs: Any) -> None:
        self.rank = -1
        self.world_size = 0
        self.model_chunks: list[Any] = []
        self.hf_config: Any = None
        self.optimizer: Any = None
        self.init_kwargs = kwargs

    def address(self) -> tuple[str, int, str]:
        """(node IP, a free port on it, node id): rank 0's answer becomes the master."""
        import ray

        ip = ray.util.get_node_ip_address()
        return ip, free_port(""), ray.get_runtime_context().get_node_id()

    def setup(
        self,
        rank: int,
        world_size: int,
        master: str,
        port: int,
        spec: ParallelSpec,
        timeout_s: float,
    ) -> None:
        import torch
        import torch.distributed as dist

        import megatron_bridge

        self.rank, self.world_size = rank, world_size
        cuda = torch.cuda.is_available()
        if cuda:
            # Ray gives each actor one visible GPU: it is always device 0 here.
            torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://{master}:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        if not cuda:
            megatron_bridge.enable_cpu_megatron()
        megatron_bridge.init_parallel(tp=spec.tp, pp=spec.pp, ep=spec.ep, seed=spec.seed)

    def execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    def teardown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


class RankFailed(RuntimeError):
    """A function failed on one rank; ``rank`` names it and the message holds its traceback."""

    def __init__(self, rank: int, what: str, cause: BaseException) -> None:
        # Ray colours its remote traceback for terminals; logs and reports want plain text.
        super().__init__(f"rank {rank} failed in {what}:\n{_ANSI.sub('', str(cause))}")
        self.rank = rank


class TrainerGroup:
    def __init__(self, actors: list[Any], owns_ray: bool) -> None:
        self.actors = actors
        self._owns_ray = owns_ray
        self._closed = False

    @property
    def world_size(self) -> int:
        return len(self.actors)

    @classmethod
    def create(
        cls,
        num_workers: int,
        *,
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        seed: int = 1234,
        worker_cls: type[TrainerWorker] = TrainerWorker,
        worker_kwargs: dict[str, Any] | None = None,
        ray_address: str | None = None,
        local_num_cpus: int | None = None,
        num_cpus_per_worker: float = 0.5,
        num_gpus_per_worker: float = 0.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> TrainerGroup:
        """Start ``num_workers`` actors and initialise torch.distributed + megatron on each.

        With ``ray_address`` the group joins that cluster; otherwise it joins the running Ray
        session, or starts a local one (``local_num_cpus`` CPUs, no dashboard).
        Fractional CPUs by default: two trainer actors plus an engine fit on 2 cores.
        """
        spec = ParallelSpec(tp=tp, pp=pp, ep=ep, seed=seed)
        if num_workers < 1 or num_workers % (tp * pp):
            raise ValueError(
                f"num_workers={num_workers} must be a positive multiple of tp*pp={tp * pp}"
            )
        owns_ray = _ensure_ray(ray_address, local_num_cpus)
        import ray

        # update_async: the source rank pushes on a thread of its own, beside the trainer's
        # calls (the default group, still one call at a time).
        remote_cls = ray.remote(concurrency_groups={BACKGROUND_GROUP: 1})(worker_cls).options(
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
            max_restarts=0,
            # OMP defaults to the node's cores in every actor: oversubscription on small hosts.
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
        )
        actors = [remote_cls.remote(**(worker_kwargs or {})) for _ in range(num_workers)]
        group = cls(actors, owns_ray)
        try:
            addresses = group._gather([a.address.remote() for a in actors], "address", timeout_s)
            ip, port, node = addresses[0]
            # One node: loopback, so no firewall or multi-homed host can get in the way.
            master = "127.0.0.1" if all(a[2] == node for a in addresses) else ip
            refs = [
                a.setup.remote(r, num_workers, master, port, spec, timeout_s)
                for r, a in enumerate(actors)
            ]
            group._gather(refs, "setup", timeout_s)
        except BaseException:
            group.shutdown()
            raise
        return group

    def run_all(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> list[Any]:
        """``fn(worker, *args, **kwargs)`` on every rank; results in rank order."""
        refs = [a.execute.remote(fn, *args, **kwargs) for a in self.actors]
        return self._gather(refs, getattr(fn, "__qualname__", repr(fn)), timeout_s)

    def run_rank(
        self,
        rank: int,
        fn: Callable[..., Any],
        *args: Any,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        concurrency_group: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """``fn(worker, ...)`` on ``rank``; in ``concurrency_group`` (``BACKGROUND_GROUP``)
        beside whatever the rank runs in its default group."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank}: the group has ranks 0..{self.world_size - 1}")
        call = self.actors[rank].execute
        if concurrency_group is not None:
            call = call.options(concurrency_group=concurrency_group)
        ref = call.remote(fn, *args, **kwargs)
        what = getattr(fn, "__qualname__", repr(fn))
        return self._gather([ref], what, timeout_s, ranks=[rank])[0]

    def _gather(
        self,
        refs: Sequence[Any],
        what: str,
        timeout_s: float,
        ranks: Sequence[int] | None = None,
    ) -> list[Any]:
        """Wait for all refs; the FIRST failure raises at once (peers of a failed collective
        would otherwise hang until the gloo timeout)."""
        import ray

        ranks = list(ranks if ranks is not None else range(len(refs)))
        rank_of = {ref: r for ref, r in zip(refs, ranks, strict=True)}
        results: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            left = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(left, 0))
            if not ready:
                late = sorted(rank_of[r] for r in pending)
                raise TimeoutError(f"{what}: ranks {late} did not finish within {timeout_s:.1f} s")
            ref = ready[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except Exception as e:  # re-raised with the rank named
                raise RankFailed(rank_of[ref], what, e) from e
        return [results[r] for r in ranks]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Destroy process groups, kill the actors (and the local Ray we started). Idempotent."""
        if self._closed:
            return
        self._closed = True
        import ray

        if not ray.is_initialized():
            return
        # A rank stuck in a collective never answers; the kill below still ends it.
        with contextlib.suppress(Exception):
            ray.wait(
                [a.teardown.remote() for a in self.actors],
                num_returns=len(self.actors),
                timeout=timeout_s,
            )
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> TrainerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _ensure_ray(address: str | None, local_num_cpus: int | None) -> bool:
    """Connect to Ray; True when this call started a local cluster (then we shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")  # set under `ray job submit`
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    # address="local": a new cluster even when another one runs on this machine (a bare
    # ray.init() would join that one, whoever started it).
    ray.init(address="local", num_cpus=local_num_cpus or os.cpu_count(), include_dashboard=False)
    return True
