"""Helpers for megatron_bridge tests: tiny configs, a gloo process launcher, forward passes.

``run_ranks(fn, world)`` starts ``world`` real processes (torch.multiprocessing, spawn), each
with a gloo default group and the CPU patches applied, runs ``fn(rank, world, *args)`` and
returns the per-rank results. A failure in any rank comes back with its formatted traceback;
the whole launch is bounded by a timeout, so nothing waits forever.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.models import tiny_config, tiny_dims
from weightsync.net import free_port


def _worker(
    rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
        import megatron_bridge

        if backend == "gloo":
            megatron_bridge.enable_cpu_megatron()
        else:
            megatron_bridge.enable_megatron_without_te()
        # Bytes, not tensors: tensors would travel as shared-memory handles that die with us.
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the traceback travels back to the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, world: int, *args: Any, timeout: float = 240.0, backend: str = "gloo"
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return results by rank.

    ``backend="gloo"``: CPU with the megatron CPU patches; ``"nccl"``: one GPU per rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, backend, fn, args, results), daemon=True)
        for r in range(world)
    ]
    return collect(procs, results, timeout)


def collect(procs: list, results: Any, timeout: float) -> list[Any]:
    """Start ``procs`` (rank r is ``procs[r]``), and their results by rank from ``results``
    (``(rank, "ok"|"error", torch.save bytes | traceback)``); the first error raised, with its
    rank's traceback; every process joined or killed whatever happens."""
    for p in procs:
        p.start()
    world, out = len(procs), {}
    try:
        for _ in range(world):
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world)) - set(out))} did not finish within {timeout}s"
                ) from None
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]


# Configs chosen to catch layout mistakes: GQA (kv heads < heads), head_dim != hidden/heads,
# a vocabulary that megatron pads, and (qwen2) qkv bias.
COMMON = tiny_dims(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(COMMON, head_dim=12),
    "mistral": dict(COMMON, head_dim=12, tie_word_embeddings=True),
    "qwen2": dict(COMMON),
    "qwen3": dict(COMMON, head_dim=12),
    "qwen2_moe": dict(
        COMMON,
        num_experts=4,
        moe_intermediate_size=16,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=24,
    ),
    "qwen3_moe": dict(
        COMMON,
        head_dim=12,
        num_experts=4,
        moe_intermediate_size=16,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    ),
    "deepseek_v3": dict(
        COMMON,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=12,
        n_routed_experts=4,
        moe_intermediate_size=16,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
}


# Scaled rotary embeddings megatron implements (values as in Llama 3.1 / DeepSeek-V3 configs).
ROPES: dict[str, dict[str, Any]] = {
    "llama3": dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "yarn": dict(
        rope_type="yarn",
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        rope_theta=10000.0,
    ),
}


def hf_config(model_type: str, **overrides: Any) -> Any:
    return tiny_config(model_type, **(CONFIGS[model_type] | overrides))


def checkpoint_keys(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names/shapes transformers writes for ``cfg`` (the format engines load)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def hf_logits(cfg: Any, weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the transformers model loaded (through its own loader) from ``weights``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        cfg.save_pretrained(d)
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, os.path.join(d, "model.safetensors")
        )
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_logits(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [batch, seq, padded vocab] on the last pipeline stage (None elsewhere).

    One microbatch, forward only: activations travel the pipeline ring (virtual stages too)
    with plain gloo send/recv.
    """
    from megatron.core import parallel_state as ps

    tokens = tokens.to(next(chunks[0].parameters()).device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    out = None
    with torch.no_grad():
        for vp, chunk in enumerate(chunks):
            chunk.eval()
            if stage > 0 or vp > 0:
                cfg = chunk.config
                buf = torch.empty(
                    tokens.shape[1],
                    tokens.shape[0],
                    cfg.hidden_size,
                    dtype=cfg.params_dtype,
                    device=tokens.device,
                )
                dist.recv(buf, src=ps.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(buf)
            out = chunk(tokens, positions, None, runtime_gather_output=True)
            if stage < pp - 1 or vp < len(chunks) - 1:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return out if stage == pp - 1 else None
