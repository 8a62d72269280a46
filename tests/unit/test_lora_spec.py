"""megatron_bridge.lora's checks and adapter_config, without processes or a model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_bridge.lora import LoraSpec, targeted_linears
from megatron_bridge.lora_export import adapter_config


def _config(**overrides: object) -> SimpleNamespace:
    """The TransformerConfig fields LoRA reads: GQA 4 heads / 2 groups of 12, hidden 32."""
    fields = dict(
        hidden_size=32,
        ffn_hidden_size=48,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=12,
        multi_latent_attention=False,
        num_moe_experts=None,
        sequence_parallel=False,
    )
    return SimpleNamespace(**(fields | overrides))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(targets=("q_proj", "qkv_proj")), "qkv_proj"),
        (dict(targets=()), "(none)"),
        (dict(rank=0), "rank=0"),
        (dict(rank=True), "rank=True"),
        (dict(rank=2.0), "rank=2.0"),
        (dict(alpha=0.0), "alpha=0.0"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_spec_refuses_naming_the_value(kwargs: dict, named: str) -> None:
    spec = dict(targets=("q_proj",), rank=4, alpha=8.0) | kwargs
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        LoraSpec(**spec)


def test_linears_of_targets() -> None:
    def paths(*targets: str) -> list[str]:
        return [lin.path for lin in targeted_linears(_config(), LoraSpec(targets, 4, 8.0))]

    assert paths("k_proj") == ["self_attention.linear_qkv"]
    assert paths("gate_proj", "down_proj", "o_proj") == [
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    ]


def test_rank_that_does_not_fit_names_the_projections() -> None:
    spec = LoraSpec(("q_proj", "k_proj", "v_proj"), 30, 8.0)  # k/v: (24, 32); q: (48, 32)
    with pytest.raises(ValueError, match="rank=30") as e:
        targeted_linears(_config(), spec)
    assert "k_proj" in str(e.value) and "v_proj" in str(e.value)
    assert "q_proj" not in str(e.value)
    targeted_linears(_config(), LoraSpec(("q_proj", "k_proj"), 24, 8.0))  # min(out, in) fits


@pytest.mark.parametrize(
    ("overrides", "targets", "named"),
    [
        (dict(num_moe_experts=4), ("q_proj", "up_proj"), "up_proj"),
        (dict(multi_latent_attention=True, v_head_dim=8), ("v_proj",), "v_proj"),
        (dict(sequence_parallel=True), ("q_proj",), "sequence_parallel"),
    ],
)
def test_unsupported_models_are_refused(overrides: dict, targets: tuple, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        targeted_linears(_config(**overrides), LoraSpec(targets, 4, 8.0))


def test_moe_and_mla_attention_can_still_be_adapted() -> None:
    moe_mla = _config(num_moe_experts=4, multi_latent_attention=True, v_head_dim=8)
    linears = targeted_linears(moe_mla, LoraSpec(("o_proj",), 4, 8.0))
    assert [lin.path for lin in linears] == ["self_attention.linear_proj"]


def test_adapter_config_is_what_peft_reads(tmp_path) -> None:
    import json

    from peft import LoraConfig

    spec = LoraSpec(("v_proj", "q_proj"), 8, 16.0, 0.05)
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter_config(spec, "base")))
    cfg = LoraConfig.from_pretrained(str(tmp_path))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16.0, 0.05)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert cfg.base_model_name_or_path == "base" and cfg.bias == "none"
