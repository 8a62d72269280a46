"""int4 on slices: what a slice of an HF weight becomes in the engine's tensors, so a trainer
rank can quantize its own shard and an engine rank place the result inside its own.

Quantizing a slice equals slicing the quantized whole exactly when the slice's input columns
start and end on group boundaries (scales are per row and group) and on whole int32 words (8
codes each), and, with zero points (packed 8 output rows per word), its rows on multiples of 8.
Anything else is refused: an inexact slice would load weights the trainer never had.
"""

from __future__ import annotations

import math

import torch

from megatron_bridge.meta import Box
from weightsync.quant.config import Int4Config
from weightsync.quant.stream import quantize_named

Part = tuple[str, Box, torch.dtype]


def packed_parts(
    name: str,
    shape: tuple[int, ...],
    box: Box,
    dtype: torch.dtype,
    cfg: Int4Config | None,
    where: str = "",
) -> list[Part]:
    """The engine tensors ``box`` of ``name`` becomes, each with its box in that tensor
    (``weight_shape`` left out: it is the whole weight's, not the slice's)."""
    if cfg is None or not cfg.is_quantized(name, shape):
        return [(name, box, dtype)]
    if len(shape) != 2:
        raise ValueError(f"{name}: int4 slices of {len(shape)}-d weights are not supported")
    (r0, r1), (c0, c1) = box
    group = shape[1] if cfg.group_size == -1 else cfg.group_size
    step = math.lcm(group, 8)  # whole groups and whole int32 words
    zero_rows = not cfg.symmetric
    if c0 % step or c1 % step or (zero_rows and (r0 % 8 or r1 % 8)):
        raise ValueError(
            f"{name}: slice rows [{r0}, {r1}) columns [{c0}, {c1}) of {shape} does not fall on "
            f"int4 group boundaries (group {group}{', zero points 8 rows per word' * zero_rows})"
            f"{where}: quantizing it on the trainer's shard would not be exact"
        )
    base, cols = name.removesuffix(".weight"), ((c0 // group, c1 // group),)
    parts = [
        (f"{base}.weight_packed", ((r0, r1), (c0 // 8, c1 // 8)), torch.int32),
        (f"{base}.weight_scale", ((r0, r1), *cols), dtype),
    ]
    if zero_rows:
        parts.append((f"{base}.weight_zero_point", ((r0 // 8, r1 // 8), *cols), torch.int32))
    return parts


def encode(name: str, piece: torch.Tensor, cfg: Int4Config | None) -> list[torch.Tensor]:
    """``piece`` (a slice of ``name``) as the tensors ``packed_parts`` names, in its order."""
    if cfg is None:
        return [piece]
    named = quantize_named(name, piece, cfg)
    return [t for n, t in named if not n.endswith(".weight_shape")]
