"""Apply an Int4Config to HF-named tensors: the quantize stage of the sync stream.

A targeted ``X.weight`` becomes ``X.weight_packed``, ``X.weight_scale``, ``X.weight_shape``
(and ``X.weight_zero_point`` when asymmetric); every other tensor passes through unchanged.
``packed_meta`` gives the same names, shapes and dtypes without touching data, so the bucket
plan can be built before any engine is paused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from weightsync.quant.config import Int4Config
from weightsync.quant.int4 import check_weight, pack_int4

Named = tuple[str, torch.Tensor]


def quantize_named(name: str, tensor: torch.Tensor, cfg: Int4Config) -> list[Named]:
    """The tensors an engine loads for one HF tensor under ``cfg``."""
    if not cfg.is_quantized(name, tensor.shape):
        return [(name, tensor)]
    base = name.removesuffix(".weight")
    packed = pack_int4(tensor, cfg.group_size, cfg.symmetric, name=name)
    return [(f"{base}.{key}", t) for key, t in packed.items()]


def quantize_stream(pairs: Iterable[Named], cfg: Int4Config | None) -> Iterator[Named]:
    for name, tensor in pairs:
        if cfg is None:
            yield name, tensor
        else:
            yield from quantize_named(name, tensor, cfg)


def packed_meta(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, cfg: Int4Config | None
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of what ``quantize_named`` yields, validated, without data."""
    if cfg is None or not cfg.is_quantized(name, shape):
        return [(name, tuple(shape), dtype)]
    check_weight(
        torch.empty(shape, dtype=dtype, device="meta"), cfg.group_size, cfg.symmetric, name
    )
    *lead, out_dim, in_dim = shape
    groups = 1 if cfg.group_size == -1 else in_dim // cfg.group_size
    base = name.removesuffix(".weight")
    metas = [
        (f"{base}.weight_packed", (*lead, out_dim, in_dim // 8), torch.int32),
        (f"{base}.weight_scale", (*lead, out_dim, groups), dtype),
        (f"{base}.weight_shape", (len(shape),), torch.int64),
    ]
    if not cfg.symmetric:
        metas.append((f"{base}.weight_zero_point", (*lead, out_dim // 8, groups), torch.int32))
    return metas
