"""deepseek_v3: multi-latent attention, sigmoid group-limited routing with a score-correction
bias, ungated shared experts, and the first ``first_k_dense_replace`` layers dense.

MLA's ``q_a_proj`` and ``kv_a_proj_with_mqa`` form one unit: engines fuse them into
``fused_qkv_a_proj_with_mqa``. The MTP (next-n) layers are not part of transformers' model and
are not built or exported.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_bridge.families.base import SAME, Dims, Family, Row, rope_theta
from megatron_bridge.families.dense import INPUT_NORM, POST_NORM, base_kwargs, dense_dims, mlp_rows
from megatron_bridge.families.moe import EXPERT, ROUTER


def deepseek_dims(cfg: Any) -> Dims:
    return dense_dims(
        cfg,
        experts=cfg.n_routed_experts,
        moe_ffn=cfg.moe_intermediate_size,
        shared_ffn=cfg.moe_intermediate_size * cfg.n_shared_experts,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_nope=cfg.qk_nope_head_dim,
        qk_rope=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
    )


def _q_width(d: Dims) -> int:
    return d.heads * (d.qk_nope + d.qk_rope)


def mla_rows(cfg: Any) -> list[Row]:
    if cfg.q_lora_rank is None:
        q = [
            Row(
                "q_proj",
                "self_attention.linear_q_proj.weight",
                SAME,
                ("self_attn.q_proj.weight",),
                lambda d: ((_q_width(d), d.hidden),),
            )
        ]
    else:
        q = [
            Row(
                "qkv_a",
                "self_attention.linear_q_down_proj.weight",
                SAME,
                ("self_attn.q_a_proj.weight",),
                lambda d: ((d.q_lora_rank, d.hidden),),
            ),
            Row(
                "q_a_norm",
                "self_attention.q_layernorm.weight",
                SAME,
                ("self_attn.q_a_layernorm.weight",),
                lambda d: ((d.q_lora_rank,),),
            ),
            Row(
                "q_b",
                "self_attention.linear_q_up_proj.weight",
                SAME,
                ("self_attn.q_b_proj.weight",),
                lambda d: ((_q_width(d), d.q_lora_rank),),
            ),
        ]
    return [
        INPUT_NORM,
        # The kv down-projection joins q_a_proj's unit (first row of `q` when q_lora_rank is set).
        q[0],
        Row(
            q[0].unit,
            "self_attention.linear_kv_down_proj.weight",
            SAME,
            ("self_attn.kv_a_proj_with_mqa.weight",),
            lambda d: ((d.kv_lora_rank + d.qk_rope, d.hidden),),
        ),
        *q[1:],
        Row(
            "kv_a_norm",
            "self_attention.kv_layernorm.weight",
            SAME,
            ("self_attn.kv_a_layernorm.weight",),
            lambda d: ((d.kv_lora_rank,),),
        ),
        Row(
            "kv_b",
            "self_attention.linear_kv_up_proj.weight",
            SAME,
            ("self_attn.kv_b_proj.weight",),
            lambda d: ((d.heads * (d.qk_nope + d.v_head_dim), d.kv_lora_rank),),
        ),
        Row(
            "o_proj",
            "self_attention.linear_proj.weight",
            SAME,
            ("self_attn.o_proj.weight",),
            lambda d: ((d.hidden, d.heads * d.v_head_dim),),
        ),
        POST_NORM,
    ]


MOE_MLP = [
    ROUTER,
    Row(
        "router",
        "mlp.router.expert_bias",
        SAME,
        ("mlp.gate.e_score_correction_bias",),
        lambda d: ((d.experts,),),
        dtype=torch.float32,
    ),
    *mlp_rows("mlp.shared_experts.", "mlp.shared_experts.", "shared_ffn"),
]


def is_moe_layer(cfg: Any, layer: int) -> bool:
    return layer >= cfg.first_k_dense_replace


def _mla_rope(cfg: Any) -> dict[str, Any]:
    rope = cfg.rope_parameters or {}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {"rope_type": "rope"}
    if kind == "yarn":
        return dict(
            rope_type="yarn",
            rotary_scaling_factor=rope["factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta_fast=rope.get("beta_fast", 32.0),
            beta_slow=rope.get("beta_slow", 1.0),
            mscale=rope.get("mscale", 1.0),
            mscale_all_dim=rope.get("mscale_all_dim", 0.0),
        )
    raise ValueError(f"deepseek_v3 rope_parameters {rope}: only 'default' and 'yarn'")


def kwargs(cfg: Any) -> dict[str, Any]:
    d = deepseek_dims(cfg)
    if getattr(cfg, "rope_interleave", True) is not True:
        raise ValueError(
            "deepseek_v3 rope_interleave=False is not supported (megatron MLA "
            "applies rotary embeddings to interleaved pairs)"
        )
    if not cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
        raise ValueError(
            "deepseek_v3 norm_topk_prob=False is not supported (megatron "
            "renormalises sigmoid top-k scores)"
        )
    return base_kwargs(cfg, d) | dict(
        multi_latent_attention=True,
        num_query_groups=cfg.num_attention_heads,
        q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim,
        qk_pos_emb_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_layernorm=True,
        rotary_base=rope_theta(cfg),
        **_mla_rope(cfg),
        num_moe_experts=cfg.n_routed_experts,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        moe_shared_expert_intermediate_size=d.shared_ffn,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=cfg.n_group,
        moe_router_group_topk=cfg.topk_group,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor,
        moe_router_load_balancing_type="none",
        moe_router_dtype="fp32",
        moe_layer_freq=[int(is_moe_layer(cfg, i)) for i in range(cfg.num_hidden_layers)],
    )


FAMILIES = (
    Family(
        model_types=("deepseek_v3",),
        dims=deepseek_dims,
        transformer_kwargs=kwargs,
        layer_rows=lambda cfg, i: (
            mla_rows(cfg) + (MOE_MLP if is_moe_layer(cfg, i) else mlp_rows("mlp.", "mlp.", "ffn"))
        ),
        expert_rows=lambda cfg, i: EXPERT if is_moe_layer(cfg, i) else [],
    ),
)
