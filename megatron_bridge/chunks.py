"""Reading megatron model chunks: names, dtypes, and which exported units a rank holds."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from megatron_bridge.families.base import Dims
from megatron_bridge.parallel import Layout
from megatron_bridge.units import Unit

# TransformerEngine's grouped experts name expert i's weights "experts.linear_fc1.weight<i>".
_TE_GROUPED = re.compile(r"(.*\.experts\.)(linear_fc[12])\.weight(\d+)")

ADAPTER = "lora_adapter"
"""Child module of a linear holding its LoRA weights (megatron_bridge.lora): exported by
``export_lora``, not by the weight export."""


def is_adapter(name: str) -> bool:
    return f".{ADAPTER}." in f".{name}"


def unwrap(chunk: nn.Module) -> nn.Module:
    """Strip DDP / Float16Module style wrappers (they keep the model in ``.module``)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def canonical_name(name: str) -> str:
    m = _TE_GROUPED.fullmatch(name)
    return f"{m[1]}local_experts.{m[3]}.{m[2]}.weight" if m else name


def local_tensors(chunks: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Per chunk: canonical name -> parameter or persistent buffer (e.g. router expert_bias)."""
    out = []
    for chunk in chunks:
        model = unwrap(chunk)
        named = dict(model.named_buffers()) | dict(model.named_parameters())
        out.append({canonical_name(n): t for n, t in named.items()})
    return out


def model_dtype(chunks: Sequence[nn.Module]) -> torch.dtype:
    dtypes = {p.dtype for c in chunks for p in c.parameters()}
    if len(dtypes) != 1:
        raise ValueError(
            f"model chunks mix parameter dtypes {sorted(map(str, dtypes))}; export needs one dtype"
        )
    return dtypes.pop()


def lookup(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"megatron parameter {name!r} not found in the model chunk")
    return tensors[name]


def holds(unit: Unit, layout: Layout) -> bool:
    """Whether this rank's chunks contain the unit's parameters."""
    on_ep = unit.expert_owner is None or unit.expert_owner == layout.ep_rank
    return unit.pp_rank == layout.pp_rank and on_ep


def check_coverage(
    units: list[Unit],
    tensors: list[dict[str, torch.Tensor]],
    chunks: Sequence[nn.Module],
    layout: Layout,
    d: Dims,
) -> None:
    """Every local parameter is exported by some unit (or is the tied output-layer copy)."""
    expected = [set() for _ in tensors]
    for unit in units:
        if holds(unit, layout):
            expected[unit.vp_stage].update(p.mcore for p in unit.pieces)
    for vp, chunk in enumerate(chunks):
        names = {
            canonical_name(n) for n, _ in unwrap(chunk).named_parameters() if not is_adapter(n)
        }
        unknown = names - expected[vp] - ({"output_layer.weight"} if d.tied else set())
        if unknown:
            raise ValueError(f"parameters with no HF mapping (chunk {vp}): {sorted(unknown)}")
