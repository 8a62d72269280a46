"""Every int4 validation fails loudly, naming the tensor or config field."""

import re

import pytest
import torch

from weightsync.quant import Int4Config, pack_int4, packed_meta, quantize_named


@pytest.mark.parametrize(
    ("shape", "group_size", "symmetric", "fragment"),
    [
        ((16, 96), 64, True, "group_size=64"),
        ((16, 60), -1, True, "multiple of 8"),
        ((12, 64), 32, False, "output dim 12"),
        ((64,), 32, True, "2-D Linear"),
    ],
)
def test_shape_errors_name_the_tensor(shape, group_size, symmetric, fragment):
    name = "model.layers.3.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=fragment) as err:
        pack_int4(torch.randn(shape), group_size, symmetric, name=name)
    assert name in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_non_finite_refused(bad, dtype):
    w = torch.randn(8, 64)
    w[5, 17] = bad
    with pytest.raises(ValueError, match="non-finite") as err:
        pack_int4(w.to(dtype), 32, True, name="q_proj.weight")
    assert "q_proj.weight" in str(err.value)


def test_integer_weight_refused():
    with pytest.raises(ValueError, match=r"dtype torch\.int8"):
        pack_int4(torch.zeros(8, 64, dtype=torch.int8), 32, True, name="w")


def test_packed_meta_validates_before_data():
    cfg = Int4Config(group_size=64, symmetric=False)
    with pytest.raises(ValueError, match=re.escape("model.layers.0.self_attn.o_proj.weight")):
        packed_meta("model.layers.0.self_attn.o_proj.weight", (128, 96), torch.bfloat16, cfg)
    metas = packed_meta("model.layers.0.self_attn.o_proj.weight", (128, 256), torch.bfloat16, cfg)
    real = quantize_named("model.layers.0.self_attn.o_proj.weight", torch.randn(128, 256), cfg)
    assert [m[0] for m in metas] == [n for n, _ in real]
    assert [m[1] for m in metas] == [tuple(t.shape) for _, t in real]


def ct_config(**weights) -> dict:
    w = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    w.update(weights)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}},
        "ignore": ["lm_head"],
    }


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=8), "num_bits"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(type="float"), "type"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"), "strategy"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(group_size=None), "group_size"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(dynamic=True), "dynamic"),
        (lambda c: c.update(format="float-quantized"), "format"),
        (lambda c: c.update(quant_method="fp8"), "quant_method"),
        (
            lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
            "input_activations",
        ),
    ],
)
def test_unsupported_quantization_config_names_the_field(mutate, field):
    qc = ct_config()
    mutate(qc)
    with pytest.raises(ValueError, match=field):
        Int4Config.from_quantization_config(qc)


def test_config_rejects_bad_group_size_and_regex():
    with pytest.raises(ValueError, match="group_size=0"):
        Int4Config(group_size=0)
    with pytest.raises(ValueError, match="bad regex"):
        Int4Config(ignore=("re:[unclosed",))
