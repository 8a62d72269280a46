"""Int4Config name rules, and the offline converter checked by transformers' own loader."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from tests.models import tiny_config
from weightsync.cli import main
from weightsync.quant import Int4Config, fake_quant_int4


def test_ignore_exact_and_regex_and_targets():
    cfg = Int4Config(ignore=("lm_head", r"re:.*layers\.1\..*"), targets=("Linear",))
    assert cfg.is_quantized("model.layers.0.self_attn.q_proj.weight", (128, 128))
    assert not cfg.is_quantized("model.layers.1.self_attn.q_proj.weight", (128, 128))
    assert not cfg.is_quantized("lm_head.weight", (256, 128))
    assert not cfg.is_quantized("model.embed_tokens.weight", (256, 128))  # not a Linear
    assert not cfg.is_quantized("model.layers.0.self_attn.q_proj.bias", (128,))
    only_mlp = Int4Config(targets=(r"re:.*mlp\.(up|down)_proj$",), ignore=())
    assert only_mlp.is_quantized("model.layers.0.mlp.up_proj.weight", (256, 128))
    assert not only_mlp.is_quantized("model.layers.0.mlp.gate_proj.weight", (256, 128))


def test_default_ignore_keeps_norms_routers_embeddings_heads():
    cfg = Int4Config()
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.visual.blocks.0.attn.qkv.weight",
    ):
        assert not cfg.is_quantized(name, (64, 64)), name
    assert cfg.is_quantized("model.layers.0.mlp.experts.3.gate_proj.weight", (64, 64))
    assert cfg.is_quantized("model.layers.0.mlp.gate_proj.weight", (64, 64))


def test_quantization_config_round_trip():
    cfg = Int4Config(group_size=64, symmetric=False, ignore=("lm_head", "re:.*norm.*"))
    assert Int4Config.from_quantization_config(cfg.to_quantization_config()) == cfg
    channel = Int4Config(group_size=-1)
    assert Int4Config.from_quantization_config(channel.to_quantization_config()) == channel


def tiny_model(tmp_path, arch: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.bfloat16)
    src = tmp_path / f"{arch}-src"
    model.save_pretrained(src, max_shard_size="200KB")  # several shards: exercises streaming
    return model, src


@pytest.mark.parametrize(("arch", "symmetric"), [("qwen2", True), ("llama", False)])
def test_convert_loads_in_transformers_with_fake_quant_logits(tmp_path, arch, symmetric):
    model, src = tiny_model(tmp_path, arch)
    dst = tmp_path / f"{arch}-int4"
    flag = "--symmetric" if symmetric else "--no-symmetric"
    assert main(["convert-int4", str(src), str(dst), "--group-size", "64", flag]) == 0

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    cfg = Int4Config.from_quantization_config(qc)
    assert cfg.symmetric is symmetric and cfg.group_size == 64
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    assert "model.layers.0.mlp.down_proj.weight_packed" in index
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in index) is (not symmetric)
    assert "lm_head.weight" in index and "model.embed_tokens.weight" in index
    with safe_open(str(dst / index["model.norm.weight"]), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16

    ids = torch.tensor([[1, 5, 9, 33, 100, 7, 200, 3]])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if cfg.is_quantized(name, p.shape):
                p.copy_(fake_quant_int4(p, 64, symmetric))
        expected = model(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.bfloat16)
        assert torch.equal(loaded(ids).logits, expected)


def test_cli_ignore_and_errors(tmp_path, capsys):
    _, src = tiny_model(tmp_path, "qwen2")
    dst = tmp_path / "out"
    assert (
        main(
            [
                "convert-int4",
                str(src),
                str(dst),
                "--group-size",
                "32",
                "--ignore",
                r"re:.*layers\.1\..*",
            ]
        )
        == 0
    )
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.up_proj.weight" in index
    assert "model.layers.0.mlp.up_proj.weight_packed" in index
    # A group size that does not divide the hidden size: a clear error naming the tensor.
    assert main(["convert-int4", str(src), str(tmp_path / "bad"), "--group-size", "96"]) == 2
    assert "group_size=96" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused from the headers, before any write
