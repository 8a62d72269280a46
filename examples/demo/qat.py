"""int4 QAT on megatron-core Linear layers: the forward sees ``fake_quant_int4(weight)``.

The grid is the packer's (``weightsync.quant``), computed on the bf16 parameter the exporter
sends, so the engine's dequantized weights are the weights this forward used, bit for bit.
Gradients pass straight through to the parameter.

TP shards: int4 groups run along the input dim. A column-parallel layer's shard holds whole
rows, so quantizing the shard equals quantizing the full weight. A row-parallel layer
(linear_proj = o_proj, linear_fc2 = down_proj) splits the input dim; per-shard quantization is
then exact only if the group size divides the shard's input width, which is checked.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from weightsync.quant import Int4Config, fake_quant_int4

# megatron local-spec Linear -> (HF module names it fuses, splits the input dim under TP)
_LINEARS = {
    "self_attention.linear_qkv": (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        False,
    ),
    "self_attention.linear_proj": (("self_attn.o_proj",), True),
    "mlp.linear_fc1": (("mlp.gate_proj", "mlp.up_proj"), False),
    "mlp.linear_fc2": (("mlp.down_proj",), True),
}


def qat_targets(model: nn.Module, cfg: Int4Config) -> list[tuple[str, nn.Module, bool]]:
    """(megatron name, module, row-parallel) of every Linear that ``cfg`` quantizes."""
    out = []
    for name, module in model.named_modules():
        prefix, _, local = name.partition(".layers.")
        index, _, sub = local.partition(".")
        if sub not in _LINEARS:
            continue
        layer = module_layer_number(model, f"{prefix}.layers.{index}")
        hf_modules, row_parallel = _LINEARS[sub]
        hf = [f"model.layers.{layer}.{m}.weight" for m in hf_modules]
        chosen = {cfg.is_quantized(n) for n in hf}
        if len(chosen) > 1:
            raise ValueError(
                f"int4 config quantizes only part of the fused megatron layer {name} "
                f"({hf}): targets/ignore must treat them alike"
            )
        if chosen.pop():
            out.append((name, module, row_parallel))
    return out


def module_layer_number(model: nn.Module, layer_path: str) -> int:
    """The HF (global, 0-based) index of a megatron TransformerLayer (pipeline offset applied)."""
    return model.get_submodule(layer_path).layer_number - 1


def check_shard(name: str, weight: Any, cfg: Int4Config, row_parallel: bool, tp: int) -> None:
    width = weight.shape[-1]
    if cfg.group_size == -1 and row_parallel and tp > 1:
        raise ValueError(
            f"{name}: per-channel int4 (group_size=-1) spans the full input dim, which is "
            f"split over tp={tp}; use a group size dividing {width}"
        )
    if cfg.group_size != -1 and width % cfg.group_size:
        raise ValueError(
            f"{name}: int4 group_size={cfg.group_size} does not divide the shard's input "
            f"width {width} (tp={tp}); per-shard groups would differ from the full weight's"
        )


def attach_int4_qat(model: nn.Module, cfg: Int4Config, tp: int) -> list[Any]:
    """Hook every targeted Linear of ``model``; returns the hook handles (``.remove()``)."""
    targets = qat_targets(model, cfg)
    if not targets:
        raise ValueError("int4 QAT: the config targets no Linear layer of the model")
    for name, module, row_parallel in targets:
        check_shard(name, module.weight, cfg, row_parallel, tp)
    handles = []
    for _, module, _ in targets:
        handles.append(module.register_forward_pre_hook(_quantize_hook(cfg)))
        # always_call: the parameter is restored even when the forward raises.
        handles.append(module.register_forward_hook(_restore_hook, always_call=True))
    return handles


def _quantize_hook(cfg: Int4Config):
    def hook(module: nn.Module, args: Any) -> None:
        weight = module._parameters["weight"]
        # Not setattr: a Parameter assigned as an attribute would be registered as another one.
        module.__dict__["_qat_weight"] = weight
        # The forward reads ``self.weight``; for one call it is the fake-quantized tensor,
        # whose straight-through gradient lands on the real parameter.
        module._parameters["weight"] = fake_quant_int4(weight, cfg.group_size, cfg.symmetric)

    return hook


def _restore_hook(module: nn.Module, args: Any, output: Any) -> None:
    weight = module.__dict__.pop("_qat_weight", None)
    if weight is not None:
        module._parameters["weight"] = weight
