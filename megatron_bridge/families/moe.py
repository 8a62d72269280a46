"""Qwen MoE families: qwen2_moe (qkv bias, gated shared expert), qwen3_moe (q/k norm).

Routed experts are exported in the checkpoint layout engines load
(``mlp.experts.<e>.{gate,up,down}_proj.weight``), not transformers 5's in-memory fused
``experts.gate_up_proj``; megatron holds them as SequentialMLP ``local_experts.<i>``.
"""

from __future__ import annotations

from typing import Any

from megatron_bridge.families.base import GLU, SAME, Dims, Family, Row
from megatron_bridge.families.dense import attention_rows, base_kwargs, dense_dims, mlp_rows


def moe_dims(cfg: Any) -> Dims:
    return dense_dims(
        cfg,
        experts=cfg.num_experts,
        moe_ffn=cfg.moe_intermediate_size,
        shared_ffn=getattr(cfg, "shared_expert_intermediate_size", 0) or 0,
    )


def is_moe_layer(cfg: Any, layer: int) -> bool:
    """transformers' rule for Qwen MoE configs (mlp_only_layers, decoder_sparse_step)."""
    step = cfg.decoder_sparse_step
    return layer not in cfg.mlp_only_layers and cfg.num_experts > 0 and (layer + 1) % step == 0


ROUTER = Row(
    "router", "mlp.router.weight", SAME, ("mlp.gate.weight",), lambda d: ((d.experts, d.hidden),)
)
EXPERT = [
    Row(
        "expert",
        "mlp.experts.local_experts.{i}.linear_fc1.weight",
        GLU,
        ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
        lambda d: ((d.moe_ffn, d.hidden), (d.moe_ffn, d.hidden)),
    ),
    Row(
        "expert",
        "mlp.experts.local_experts.{i}.linear_fc2.weight",
        SAME,
        ("mlp.experts.{e}.down_proj.weight",),
        lambda d: ((d.hidden, d.moe_ffn),),
    ),
]


def router_kwargs(cfg: Any) -> dict[str, Any]:
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_router_topk=cfg.num_experts_per_tok,
        # norm_topk_prob: softmax over the top-k logits (renormalised); otherwise softmax over
        # all experts first and keep the top-k probabilities as they are.
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.router_aux_loss_coef,
        moe_layer_freq=[int(is_moe_layer(cfg, i)) for i in range(cfg.num_hidden_layers)],
    )


def _qwen_moe(model_type: str, *, bias: bool, qk_norm: bool, shared: bool) -> Family:
    attention = attention_rows(bias=bias, qk_norm=qk_norm)
    dense_mlp = mlp_rows("mlp.", "mlp.", "ffn")
    moe_mlp = [ROUTER]
    if shared:
        moe_mlp += mlp_rows("mlp.shared_experts.", "mlp.shared_expert.", "shared_ffn")
        moe_mlp.append(
            Row(
                "shared_gate",
                "mlp.shared_experts.gate_weight",
                SAME,
                ("mlp.shared_expert_gate.weight",),
                lambda d: ((1, d.hidden),),
            )
        )

    def kwargs(cfg: Any) -> dict[str, Any]:
        kw = base_kwargs(cfg, moe_dims(cfg)) | router_kwargs(cfg)
        kw |= {"add_qkv_bias": bias, "qk_layernorm": qk_norm}
        if shared:
            kw |= dict(
                moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                moe_shared_expert_gate=True,
            )
        return kw

    return Family(
        model_types=(model_type,),
        dims=moe_dims,
        transformer_kwargs=kwargs,
        layer_rows=lambda cfg, i: attention + (moe_mlp if is_moe_layer(cfg, i) else dense_mlp),
        expert_rows=lambda cfg, i: EXPERT if is_moe_layer(cfg, i) else [],
    )


FAMILIES = (
    _qwen_moe("qwen2_moe", bias=True, qk_norm=False, shared=True),
    _qwen_moe("qwen3_moe", bias=False, qk_norm=True, shared=False),
)
