"""Metadata of the export stream (no megatron import: the bucket planner reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class HFWeightMeta:
    """One tensor ``export_hf_weights`` will yield, known before any data moves."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    unit: str
    """Atomic unit: tensors sharing it are yielded together and must share a bucket."""

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


Box = tuple[tuple[int, int], ...]
"""A slice of an HF tensor: [start, stop) per dim."""


def box_numel(box: Box) -> int:
    numel = 1
    for lo, hi in box:
        numel *= max(hi - lo, 0)
    return numel


@dataclass(frozen=True, slots=True)
class Holding:
    """One slice of one HF tensor and the trainer ranks holding it (replicas, in rank order).

    Computed by ``megatron_bridge.holdings`` from configs alone; read by weightsync's reshard
    plan, which needs no megatron."""

    name: str
    shape: tuple[int, ...]
    box: Box
    ranks: tuple[int, ...]
    mcore: str = ""
    """The megatron parameter it is read from (name inside its model chunk)."""
    vp_stage: int = 0
    part: int = 0
    """Which of the parameter's HF tensors (q, k, v of a fused qkv)."""
    block: int = -1
    """The tensor-parallel block of the parameter held (-1: the whole parameter)."""
    tp_size: int = 1
    """Size of the (expert) tensor-parallel group the parameter is cut over."""
    kind: Any = None
    """megatron_bridge's layout Kind of the parameter (opaque to weightsync)."""
