"""The demo's model: a tiny Qwen2 built from a config (no download), saved for the engine.

The engine's checkpoint and the trainer's initial weights are the same bf16 tensors: the HF
model is initialised here, saved with ``save_pretrained`` in bf16, and the trainer loads that
directory with ``megatron_bridge.load_hf_weights``. With int4, the served directory is the
packed (compressed-tensors) conversion of that checkpoint, on the trainer's QAT grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weightsync.quant import Int4Config
from weightsync_demo.config import DemoConfig

HEAD_DIM = 64  # the vLLM CPU attention kernel needs head_dim >= 64


def tiny_qwen2_config(cfg: DemoConfig) -> Any:
    from transformers import AutoConfig

    heads = cfg.hidden_size // HEAD_DIM
    if heads * HEAD_DIM != cfg.hidden_size or heads % cfg.tp:
        raise ValueError(
            f"hidden_size={cfg.hidden_size} must be a multiple of {HEAD_DIM} "
            f"with a head count divisible by tp={cfg.tp}"
        )
    return AutoConfig.for_model(
        "qwen2",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=2 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=cfg.tp,  # one KV head per TP rank
        head_dim=HEAD_DIM,
        max_position_embeddings=max(256, cfg.prompt_len + cfg.response_len),
        tie_word_embeddings=False,
        # Token ids only (no tokenizer); generation runs with ignore_eos.
        bos_token_id=0,
        eos_token_id=cfg.vocab_size - 1,
    )


def int4_config(cfg: DemoConfig) -> Int4Config | None:
    return Int4Config(group_size=cfg.int4_group_size) if cfg.int4 else None


@dataclass(frozen=True, slots=True)
class ModelDirs:
    hf_dir: Path
    """bf16 checkpoint: the trainer's initial weights."""
    serve_dir: Path
    """What the engine serves: ``hf_dir`` itself, or its int4 conversion."""


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' "Writing model shards" bar: one file, nothing to follow on the console."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


PRETRAIN_STEPS = 60


def _pretrain(model: torch.nn.Module, cfg: DemoConfig) -> None:
    """RL starts from a pretrained base, not a random one. From a random base, full training
    collapses onto a prompt-independent cycle (e.g. 5 6 7 8 5 6 7 8, reward 0.75) and LoRA
    cannot grow the tiny LM head into sharp outputs (a random base's reward does not move in
    50 LoRA steps). A few seconds of supervised steps on a related task (+1/+2/+3) make one."""
    from weightsync_demo.task import pretraining_batch

    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    length = cfg.prompt_len + cfg.response_len
    for _ in range(PRETRAIN_STEPS):
        seq_BS = pretraining_batch(g, cfg.batch_size, length, cfg.vocab_size)
        logits = model(seq_BS[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), seq_BS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def write_model_dirs(cfg: DemoConfig, root: Path) -> ModelDirs:
    from transformers import AutoModelForCausalLM

    hf_config = tiny_qwen2_config(cfg)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    _pretrain(model, cfg)
    hf_dir = root / "model_bf16"
    with _no_progress_bars():
        model.to(torch.bfloat16).save_pretrained(hf_dir)
    qcfg = int4_config(cfg)
    if qcfg is None:
        return ModelDirs(hf_dir, hf_dir)
    from weightsync.quant.convert import convert_checkpoint

    serve_dir = root / "model_int4"
    convert_checkpoint(hf_dir, serve_dir, qcfg, progress=False)
    return ModelDirs(hf_dir, serve_dir)
