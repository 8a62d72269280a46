"""LoRA adapters (megatron_bridge.lora) <-> PEFT-named full tensors and ``adapter_config.json``.

The adapter is exported through the weight export's own machinery: its plan is derived from the
model's export plan (so HF module names, pipeline stages and virtual stages come from the
family tables), and its units go through the same gather and pipeline hops
(``export.stream_units``). One unit per adapted HF projection, A then B::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   [out, r]

which is what PEFT's ``save_pretrained`` writes and ``set_peft_model_state_dict`` loads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_bridge.chunks import ADAPTER, holds, local_tensors, lookup, model_dtype, unwrap
from megatron_bridge.export import plan, stream_units
from megatron_bridge.families import get_family
from megatron_bridge.families.base import SAME
from megatron_bridge.load import hf_source, local_shard, read_hf
from megatron_bridge.lora import LoraSpec, targeted_linears
from megatron_bridge.meta import HFWeightMeta
from megatron_bridge.parallel import current_layout
from megatron_bridge.units import Piece, Unit

PEFT_PREFIX = "base_model.model."


def _adapter_unit(unit: Unit, piece: Piece, hf: str, shape: tuple[int, ...], r: int) -> Unit:
    """The LoRA unit of HF projection ``hf`` (of shape (out, in)) computed by ``piece``."""
    module = hf.removesuffix(".weight")
    part = module.rpartition(".")[2]
    mcore = piece.mcore.removesuffix(".weight") + f".{ADAPTER}."
    out, full_in = shape
    pieces = tuple(
        Piece(
            f"{mcore}lora_{ab}.{part}",
            SAME,
            (f"{PEFT_PREFIX}{module}.lora_{ab}.weight",),
            (s,),
            None,
        )
        for ab, s in (("A", (r, full_in)), ("B", (out, r)))
    )
    return Unit(module, unit.pp_rank, unit.vp_stage, None, pieces)


def lora_units(
    model_chunks: Sequence[nn.Module], hf_config: Any, spec: LoraSpec
) -> tuple[Any, list[Unit]]:
    """The HF config and the adapter's export plan (identical on every rank, no data)."""
    cfg, units = plan(model_chunks, hf_config)
    linears = targeted_linears(unwrap(model_chunks[0]).config, spec)
    adapted = {f"{lin.path}.weight" for lin in linears}
    out = []
    for unit in units:
        for piece in unit.pieces:
            # decoder.layers.<local>.<path>.weight; experts never match (their paths differ).
            in_layer = piece.mcore.partition("decoder.layers.")[2].partition(".")[2]
            if unit.expert_owner is not None or in_layer not in adapted:
                continue
            for hf, shape in zip(piece.hf, piece.shapes, strict=True):
                if hf.removesuffix(".weight").rpartition(".")[2] in spec.targets:
                    out.append(_adapter_unit(unit, piece, hf, shape, spec.rank))
    return cfg, out


def lora_weight_metadata(
    model_chunks: Sequence[nn.Module], hf_config: Any, spec: LoraSpec
) -> list[HFWeightMeta]:
    """Every tensor ``export_lora`` yields, in order; no communication."""
    _, units = lora_units(model_chunks, hf_config, spec)
    dtype = model_dtype(model_chunks)
    return [
        HFWeightMeta(p.hf[0], p.shapes[0], dtype, unit.name) for unit in units for p in unit.pieces
    ]


def export_lora(
    model_chunks: Sequence[nn.Module], hf_config: Any, spec: LoraSpec, batched: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """(PEFT name, full tensor) of the adapter, on the export source rank only.

    Collective like ``export_hf_weights``: every rank iterates it to the end. Unsharded
    tensors alias the parameters: copy them if you keep them past the next optimizer step.
    ``batched``: megabytes in hundreds of tensors go in one TP gather, not one each
    (``stream_units``); False only to measure the difference.
    """
    cfg, units = lora_units(model_chunks, hf_config, spec)
    for unit in stream_units(model_chunks, cfg, units, batched=batched):
        yield from unit


def load_lora_weights(
    model_chunks: Sequence[nn.Module],
    adapter: Mapping[str, torch.Tensor] | str | Path,
    hf_config: Any,
    spec: LoraSpec,
) -> None:
    """Copy a PEFT adapter (state dict, or a directory with ``adapter_model.safetensors``) into
    this rank's LoRA shards. No communication; ValueError for missing, extra or misshapen
    tensors."""
    cfg, units = lora_units(model_chunks, hf_config, spec)
    source = hf_source(adapter)
    extra = sorted(set(source) - {p.hf[0] for u in units for p in u.pieces})
    if extra:
        raise ValueError(f"adapter tensors this LoRA spec does not have: {extra[:8]}")
    layout, d = current_layout(), get_family(cfg).dims(cfg)
    tensors = local_tensors(model_chunks)
    with torch.no_grad():
        for unit in units:
            if not holds(unit, layout):
                continue
            for p in unit.pieces:
                local = lookup(tensors[unit.vp_stage], p.mcore)
                full = [read_hf(source, p.hf[0], p.shapes[0])]
                local.copy_(local_shard(local, SAME.to_mcore, full, d, layout, False, p.mcore))


def adapter_config(spec: LoraSpec, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT, vLLM and SGLang read for the exported tensors."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
