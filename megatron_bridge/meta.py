"""Metadata of the export stream (no megatron import: the bucket planner reads it)."""

from __future__ import annotations

from dataclasses import dataclass

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
