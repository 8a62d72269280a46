"""Which slice of every HF tensor each engine rank serves: the engine half of a reshard plan.

vLLM's parallel layers cut HF tensors like this, for tensor parallel t and rank s:
  column parallel (q/gate/up, MLA's q_b/kv_b)  rows, t equal blocks
  k/v projections           rows by KV head: t equal blocks, or when t > kv_heads, head
                            s // (t / kv_heads), replicated over t / kv_heads ranks
  row parallel (o/down)     columns, t equal blocks
  embeddings, lm_head       rows of the vocabulary padded to a multiple of ``vocab_pad``
                            (vLLM's 64), t blocks, clipped to the real vocabulary
  routed experts            without expert parallel: gate/up rows and down columns, t blocks;
                            with it: expert e whole on rank e // (experts / t)
  norms, routers, MLA's down projections, the shared-expert gate: whole on every rank
A name no rule knows is refused, naming it: guessing a layout would load the wrong slice.

The rules are read off vLLM 0.32's layer classes (QKVParallelLinear, MergedColumnParallel-
Linear, RowParallelLinear, VocabParallelEmbedding, FusedMoE). They live here, not in the engine,
so that a plan for a 1T config needs no engine. A running engine is held to them by what it
computes: its loaders cut the whole-shaped tensors it is handed, and verify reads the result
back through its kernels (tests/engines/test_vllm_sharded.py, with vocabulary cuts that differ
between megatron and vLLM). An engine laid out by more than TP is refused when it joins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from megatron_bridge.meta import Box
from weightsync.model_config import summary

VLLM_VOCAB_PAD = 64
_EXPERT = re.compile(r".*\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_COLUMN = (
    "q_proj.weight",
    "q_proj.bias",
    "gate_proj.weight",
    "up_proj.weight",
    "q_b_proj.weight",
    "kv_b_proj.weight",
)
_KV = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")
_ROW = ("o_proj.weight", "down_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_WHOLE = (
    "norm.weight",
    "layernorm.weight",
    "mlp.gate.weight",
    "mlp.gate.e_score_correction_bias",
    "shared_expert_gate.weight",
    "q_a_proj.weight",
    "kv_a_proj_with_mqa.weight",
)


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """How one engine is parallelised (vLLM's ``--tensor-parallel-size`` and
    ``--enable-expert-parallel``; data parallel 1)."""

    tp: int = 1
    expert_parallel: bool = False
    vocab_pad: int = VLLM_VOCAB_PAD

    def __post_init__(self) -> None:
        if self.tp < 1 or self.vocab_pad < 1:
            raise ValueError(f"engine layout {self}: tp and vocab_pad must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelShape:
    """The few model numbers the engine's cut depends on."""

    vocab: int
    heads: int
    kv_heads: int
    experts: int = 0

    @classmethod
    def of(cls, hf_config: Any) -> ModelShape:
        """From an HF config (object or dict)."""
        s = summary(hf_config)
        return cls(
            vocab=s["vocab_size"],
            heads=s["num_attention_heads"],
            kv_heads=s["num_key_value_heads"],
            experts=s["num_experts"],
        )


def engine_box(
    name: str, shape: tuple[int, ...], layout: EngineLayout, model: ModelShape, rank: int
) -> Box | None:
    """The slice of HF tensor ``name`` that engine rank ``rank`` serves (None: no part of it)."""
    t = layout.tp
    expert = _EXPERT.fullmatch(name)
    if expert and layout.expert_parallel:
        return _expert_box(name, shape, int(expert[1]), model, t, rank)
    if name.endswith(_VOCAB):
        return _vocab_box(name, shape, layout, model, rank)
    if name.endswith(_KV):
        if t > model.kv_heads:
            return _kv_replicated(name, shape, layout, model, rank)
        _heads_split(name, model.kv_heads, layout)
        return _block(name, shape, 0, t, rank, layout)
    if ".self_attn." in name and name.endswith(_COLUMN + _ROW):
        _heads_split(name, model.heads, layout)
    if name.endswith(_COLUMN):
        return _block(name, shape, 0, t, rank, layout)
    if name.endswith(_ROW):
        return _block(name, shape, 1, t, rank, layout)
    if name.endswith(_WHOLE):
        return _whole(shape)
    raise ValueError(f"{name}: no engine layout rule for this tensor (engine {layout})")


def _expert_box(
    name: str, shape: tuple[int, ...], e: int, model: ModelShape, t: int, rank: int
) -> Box | None:
    if model.experts % t:
        raise ValueError(
            f"{name}: {model.experts} experts do not split evenly over expert parallel {t}"
        )
    return _whole(shape) if e // (model.experts // t) == rank else None


def _vocab_box(
    name: str, shape: tuple[int, ...], layout: EngineLayout, model: ModelShape, rank: int
) -> Box | None:
    padded = -(-model.vocab // layout.vocab_pad) * layout.vocab_pad
    if padded % layout.tp:
        raise ValueError(f"{name}: padded vocabulary {padded} does not split over engine {layout}")
    block = padded // layout.tp
    lo, hi = min(rank * block, shape[0]), min((rank + 1) * block, shape[0])
    return _cut(shape, 0, lo, hi) if hi > lo else None


def _heads_split(name: str, heads: int, layout: EngineLayout) -> None:
    if heads % layout.tp:
        raise ValueError(f"{name}: {heads} heads do not split over engine {layout}")


def _kv_replicated(
    name: str, shape: tuple[int, ...], layout: EngineLayout, model: ModelShape, rank: int
) -> Box:
    if layout.tp % model.kv_heads:
        raise ValueError(
            f"{name}: {model.kv_heads} KV heads cannot be replicated over tensor parallel "
            f"{layout.tp}"
        )
    head = rank // (layout.tp // model.kv_heads)
    size = shape[0] // model.kv_heads
    return _cut(shape, 0, head * size, (head + 1) * size)


def _block(
    name: str, shape: tuple[int, ...], dim: int, t: int, rank: int, layout: EngineLayout
) -> Box:
    if shape[dim] % t:
        raise ValueError(f"{name}: dim {dim} of {shape} does not split over engine {layout}")
    step = shape[dim] // t
    return _cut(shape, dim, rank * step, (rank + 1) * step)


def _whole(shape: tuple[int, ...]) -> Box:
    return tuple((0, s) for s in shape)


def _cut(shape: tuple[int, ...], dim: int, lo: int, hi: int) -> Box:
    return tuple((lo, hi) if i == dim else (0, s) for i, s in enumerate(shape))
