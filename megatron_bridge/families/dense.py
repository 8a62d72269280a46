"""Dense decoder families: llama, mistral (plain GQA), qwen2 (qkv bias), qwen3 (q/k RMSNorm).

The attention and MLP row builders here are shared with the MoE families.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from megatron_bridge.families.base import GLU, QKV, SAME, Dims, Family, Row


def dense_dims(cfg: Any, **extra: Any) -> Dims:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Dims(
        vocab=cfg.vocab_size,
        hidden=cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=cfg.num_key_value_heads or heads,
        head_dim=head_dim,
        ffn=cfg.intermediate_size,
        tied=bool(cfg.tie_word_embeddings),
        **extra,
    )


def base_kwargs(cfg: Any, d: Dims) -> dict[str, Any]:
    """TransformerConfig fields every family here shares (RMSNorm, SwiGLU, no linear bias)."""
    if cfg.hidden_act != "silu":
        raise ValueError(f"hidden_act={cfg.hidden_act!r}: only 'silu' (SwiGLU) is supported")
    # Fields only some families' configs have; set, they change the math megatron would run.
    if getattr(cfg, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported (megatron MLPs here have no bias)")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported")
    return dict(
        num_layers=d.layers,
        hidden_size=d.hidden,
        num_attention_heads=d.heads,
        num_query_groups=d.kv_heads,
        kv_channels=d.head_dim,
        ffn_hidden_size=d.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
    )


def _hidden(d: Dims) -> tuple[tuple[int, ...], ...]:
    return ((d.hidden,),)


# The two norms around attention: the same rows for GQA (here) and MLA (deepseek).
INPUT_NORM = Row("input_norm", "input_layernorm.weight", SAME, ("input_layernorm.weight",), _hidden)
POST_NORM = Row(
    "post_norm", "pre_mlp_layernorm.weight", SAME, ("post_attention_layernorm.weight",), _hidden
)


def attention_rows(*, bias: bool, qk_norm: bool) -> list[Row]:
    def q(d: Dims) -> tuple[int, ...]:
        return (d.heads * d.head_dim,)

    def kv(d: Dims) -> tuple[int, ...]:
        return (d.kv_heads * d.head_dim,)

    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    rows = [
        INPUT_NORM,
        Row(
            "qkv",
            "self_attention.linear_qkv.weight",
            QKV,
            tuple(n + ".weight" for n in names),
            lambda d: ((*q(d), d.hidden), (*kv(d), d.hidden), (*kv(d), d.hidden)),
        ),
    ]
    if bias:
        rows.append(
            Row(
                "qkv",
                "self_attention.linear_qkv.bias",
                QKV,
                tuple(n + ".bias" for n in names),
                lambda d: (q(d), kv(d), kv(d)),
            )
        )
    if qk_norm:
        rows += [
            Row(
                "q_norm",
                "self_attention.q_layernorm.weight",
                SAME,
                ("self_attn.q_norm.weight",),
                lambda d: ((d.head_dim,),),
            ),
            Row(
                "k_norm",
                "self_attention.k_layernorm.weight",
                SAME,
                ("self_attn.k_norm.weight",),
                lambda d: ((d.head_dim,),),
            ),
        ]
    rows += [
        Row(
            "o_proj",
            "self_attention.linear_proj.weight",
            SAME,
            ("self_attn.o_proj.weight",),
            lambda d: ((d.hidden, d.heads * d.head_dim),),
        ),
        POST_NORM,
    ]
    return rows


def mlp_rows(mcore: str, hf: str, ffn: str) -> list[Row]:
    """A SwiGLU MLP: ``mcore``/``hf`` module prefixes, ``ffn`` the Dims field of its width."""

    def width(d: Dims) -> int:
        return getattr(d, ffn)

    return [
        Row(
            hf + "gate_up",
            mcore + "linear_fc1.weight",
            GLU,
            (hf + "gate_proj.weight", hf + "up_proj.weight"),
            lambda d: ((width(d), d.hidden), (width(d), d.hidden)),
        ),
        Row(
            hf + "down",
            mcore + "linear_fc2.weight",
            SAME,
            (hf + "down_proj.weight",),
            lambda d: ((d.hidden, width(d)),),
        ),
    ]


def _dense_family(model_type: str, *, bias: bool, qk_norm: bool) -> Family:
    rows = attention_rows(bias=bias, qk_norm=qk_norm) + mlp_rows("mlp.", "mlp.", "ffn")

    def kwargs(cfg: Any) -> dict[str, Any]:
        kw = base_kwargs(cfg, dense_dims(cfg))
        if bias != bool(getattr(cfg, "attention_bias", bias)):
            raise ValueError(
                f"{model_type}: attention_bias={cfg.attention_bias} is not "
                f"supported (this family has qkv bias={bias})"
            )
        return kw | {"add_qkv_bias": bias, "qk_layernorm": qk_norm}

    return Family(
        model_types=(model_type,),
        dims=dense_dims,
        transformer_kwargs=kwargs,
        layer_rows=lambda cfg, layer: rows,
    )


FAMILIES = (
    _dense_family("llama", bias=False, qk_norm=False),
    _dense_family("mistral", bias=False, qk_norm=False),
    _dense_family("qwen2", bias=True, qk_norm=False),
    _dense_family("qwen3", bias=False, qk_norm=True),
)
