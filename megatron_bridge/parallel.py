"""Parallel layout: initialising megatron's parallel_state and reading this rank's coordinates.

The exporter needs a few facts per rank: its TP/ETP/EP/PP coordinates, the groups to gather
in, and whether this rank is a *holder* (the replica whose shards we read: data-parallel rank
0). Reading them in one place keeps the gather code free of parallel_state calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_bridge.cpu import cpu_megatron_enabled

EXPORT_SOURCE_RANK = 0
"""Global rank on which the exporter yields tensors (pp=tp=ep=etp=dp=0 in megatron's order)."""


def init_parallel(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int = 1234,
) -> None:
    """Initialise megatron's parallel groups on an existing default process group, then seed.

    ``etp`` defaults to ``tp`` (megatron's default). On CPU call ``enable_cpu_megatron()`` first:
    seeding goes through megatron's CUDA RNG tracker.
    """
    if not dist.is_initialized():
        raise ValueError(
            "init_parallel: torch.distributed is not initialised (call "
            "dist.init_process_group first)"
        )
    if not torch.cuda.is_available() and not cpu_megatron_enabled():
        raise ValueError("init_parallel on a CPU host needs enable_cpu_megatron() first")
    world = dist.get_world_size()
    if world % (tp * pp) or world % ((etp or tp) * ep * pp):
        raise ValueError(
            f"world size {world} is not divisible by tp={tp} x pp={pp} "
            f"and by etp={etp or tp} x ep={ep} x pp={pp}"
        )
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True, slots=True)
class Layout:
    """This rank's place in the model-parallel grid (everything the exporter reads)."""

    tp: int
    tp_rank: int
    etp: int
    etp_rank: int
    ep: int
    ep_rank: int
    pp: int
    pp_rank: int
    vpp: int
    dense_holder: bool
    """Data-parallel rank 0 (and context-parallel rank 0): its dense shards are the ones read."""
    expert_holder: bool
    """Expert-data-parallel rank 0: its expert shards are the ones read."""
    on_source_line: bool
    """In the pipeline group of the source rank (the line units travel down to rank 0)."""
    tp_group: object
    etp_group: object
    ep_group: object
    pp_group: object

    @property
    def is_source(self) -> bool:
        return dist.get_rank() == EXPORT_SOURCE_RANK


def current_layout() -> Layout:
    if not ps.model_parallel_is_initialized():
        raise ValueError("megatron parallel_state is not initialised (see init_parallel)")
    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        dense_holder=ps.get_data_parallel_rank(with_context_parallel=True) == 0,
        expert_holder=ps.get_expert_data_parallel_rank() == 0,
        on_source_line=EXPORT_SOURCE_RANK
        in dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
        tp_group=ps.get_tensor_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
    )
