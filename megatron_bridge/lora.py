"""LoRA adapters on megatron-core linears, sharded like the linears they adapt.

``apply_lora`` gives every targeted linear a child module ``lora_adapter`` holding one A [r, I]
and one B [O, r] per HF projection, and a forward hook that adds
``alpha / r * B(A(dropout(x)))`` to the linear's output: PEFT's LoRA on the HF model. A fused
linear (``linear_qkv`` = q/k/v, ``linear_fc1`` = gate/up) keeps separate A/B per projection, so
what is trained is exactly what PEFT would train on the unfused HF modules.

Why a hook and not a wrapper module: the base parameters keep their names (export, load and
checkpoints stay as they are), and the int4 QAT hooks (``weightsync_demo.qat``) keep running
on the same module, so the base path is fake-quantized on the engine's grid and the LoRA delta
(in the model's dtype, never quantized) is added on top.

TP sharding (only megatron's own region functions communicate):
  column-parallel (linear_qkv, linear_fc1): A replicated; B split along the output as the
    projection's rows of the fused weight are (rank t holds KV groups / gate-up rows of shard
    t); the local delta is laid out like the fused local output ([q_g | k_g | v_g] per local
    KV group, [gate_t | up_t]). h = A x passes ``copy_to_tensor_model_parallel_region``, whose
    backward sums dL/dh over the B shards: A's gradient is then whole on every rank.
  row-parallel (linear_proj, linear_fc2): A split along the input; h = A_t x_t is all-reduced
    (``reduce_from_tensor_model_parallel_region``) and B is replicated.

Shape legend: r LoRA rank, O out features, I in features, G KV groups on this rank.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    get_cuda_rng_tracker,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer import TransformerConfig
from torch import nn

from megatron_bridge.chunks import ADAPTER, unwrap
from megatron_bridge.gather import shard_of

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_QKV = ("q_proj", "k_proj", "v_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """What ``apply_lora`` built; export and load need it again, identical on every rank."""

    targets: tuple[str, ...]
    """HF projection names from ``PROJECTIONS``."""
    rank: int
    alpha: float
    dropout: float = 0.0

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets {unknown or '(none)'} are not supported: choose from {PROJECTIONS}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r}: must be a positive int")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, slots=True)
class Linear:
    """One megatron linear of a decoder layer and the HF projections it computes, in order."""

    path: str
    """Module path inside a TransformerLayer."""
    row_parallel: bool
    parts: tuple[str, ...]


LINEARS = (
    Linear("self_attention.linear_qkv", False, _QKV),
    Linear("self_attention.linear_proj", True, ("o_proj",)),
    Linear("mlp.linear_fc1", False, ("gate_proj", "up_proj")),
    Linear("mlp.linear_fc2", True, ("down_proj",)),
)


def hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """Full HF (O, I) of every projection."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    head_dim = config.kv_channels
    attn = config.num_attention_heads * (
        config.v_head_dim if config.multi_latent_attention else head_dim
    )
    kv = config.num_query_groups * head_dim
    return {
        "q_proj": (config.num_attention_heads * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, attn),
        "gate_proj": (ffn, hidden),
        "up_proj": (ffn, hidden),
        "down_proj": (hidden, ffn),
    }


def targeted_linears(config: TransformerConfig, spec: LoraSpec) -> list[Linear]:
    """The linears of every decoder layer that get adapters; ValueError for what cannot."""
    chosen = set(spec.targets)
    if config.sequence_parallel:
        raise ValueError("LoRA with sequence_parallel=True is not supported")
    if config.multi_latent_attention and chosen & set(_QKV):
        raise ValueError(
            f"LoRA targets {sorted(chosen & set(_QKV))}: MLA attention has no q/k/v projections"
        )
    if config.num_moe_experts and chosen & set(_MLP):
        # PEFT would adapt the shared experts' projections too; the experts are not adapted here.
        raise ValueError(
            f"LoRA targets {sorted(chosen & set(_MLP))}: MoE MLPs are not supported "
            "(target attention projections only)"
        )
    shapes = hf_shapes(config)
    too_small = {p: shapes[p] for p in spec.targets if spec.rank > min(shapes[p])}
    if too_small:
        raise ValueError(
            f"LoRA rank={spec.rank} does not fit {too_small} (HF (out, in)): "
            "the rank must be <= min(out, in) of every targeted projection"
        )
    return [lin for lin in LINEARS if chosen & set(lin.parts)]


class LoraAdapter(nn.Module):
    """This rank's A/B of each targeted projection of one linear, and the delta they add."""

    def __init__(
        self,
        linear: Linear,
        spec: LoraSpec,
        config: TransformerConfig,
        layer: int,
        seed: int,
        weight: torch.Tensor,
    ) -> None:
        """``weight``: the base weight, whose dtype and device the adapter takes."""
        super().__init__()
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        self.row_parallel = linear.row_parallel
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout)
        self.groups = config.num_query_groups // tp if linear.parts == _QKV else 1
        shapes = hf_shapes(config)
        # Local output width of each projection inside one group of the fused output.
        out_tp = 1 if linear.row_parallel else tp
        self.widths = {p: shapes[p][0] // out_tp // self.groups for p in linear.parts}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for part in linear.parts:
            if part in spec.targets:
                out, full_in = shapes[part]
                a = _init_a(spec.rank, full_in, f"{seed}/{layer}/{part}")
                if linear.row_parallel:
                    a = shard_of(a, 1, 1, tp_rank, tp)
                self.lora_A[part] = _param(a, weight, 1 if linear.row_parallel else None)
                b = torch.zeros(out // out_tp, spec.rank)  # PEFT's default: the delta starts at 0
                self.lora_B[part] = _param(b, weight, None if linear.row_parallel else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._part(x, p) for p in self.widths]
        return torch.cat(parts, dim=-1).flatten(-2)

    def _part(self, x: torch.Tensor, part: str) -> torch.Tensor:
        shape = (self.groups, self.widths[part])
        if part not in self.lora_A:
            return x.new_zeros(*x.shape[:-1], *shape)
        h = F.linear(self._dropout(x), self.lora_A[part])
        if self.row_parallel:
            h = reduce_from_tensor_model_parallel_region(h)
        else:
            h = copy_to_tensor_model_parallel_region(h)
        return (F.linear(h, self.lora_B[part]) * self.scaling).unflatten(-1, shape)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # A row-parallel input is one shard of an activation: its mask comes from the
        # TP-rank-specific RNG stream (megatron's convention for sharded activations), so the
        # shards do not repeat one mask. A replicated input uses the default stream, equal on
        # all TP ranks, so every B shard sees the same dropped input.
        sharded = self.row_parallel and self.training and self.dropout.p > 0
        with get_cuda_rng_tracker().fork() if sharded else contextlib.nullcontext():
            return self.dropout(x)


def _init_a(rank: int, full_in: int, key: str) -> torch.Tensor:
    """Kaiming-uniform (a=sqrt(5), as PEFT/nn.Linear) full A, seeded per layer and projection:
    the same on every TP/DP rank and for any TP size."""
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    a = torch.empty(rank, full_in)
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)


def _param(t: torch.Tensor, like: torch.Tensor, sharded_dim: int | None) -> nn.Parameter:
    p = nn.Parameter(t.to(device=like.device, dtype=like.dtype))
    # Read by the exporter's gather and by megatron's optimizer (grad norm counts replicated
    # parameters once per TP group).
    dim = -1 if sharded_dim is None else sharded_dim
    set_tensor_model_parallel_attributes(p, sharded_dim is not None, dim, 1)
    return p


def _add_delta(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    out, bias = output
    return out + getattr(module, ADAPTER)(args[0]), bias


def _attach(module: nn.Module, linear: Linear, spec: LoraSpec, layer: int, seed: int) -> None:
    if hasattr(module, ADAPTER):
        raise ValueError(f"layer {layer} {linear.path} already has a LoRA adapter")
    # The delta is laid out like the unsharded-input, sharded-output (column) or all-reduced
    # output (row) of the local spec's linears; anything else would add it in the wrong place.
    assert getattr(module, "input_is_parallel", True), linear.path
    assert not getattr(module, "gather_output", False), linear.path
    adapter = LoraAdapter(linear, spec, module.config, layer, seed, module.weight)
    module.add_module(ADAPTER, adapter)
    module.register_forward_hook(_add_delta)


def apply_lora(
    model_chunks: Sequence[nn.Module],
    targets: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    seed: int = 0,
) -> LoraSpec:
    """Add LoRA to every targeted linear of every decoder layer and freeze everything else.

    ``targets``: HF projection names (``PROJECTIONS``); a fused megatron linear gets adapters
    for the projections of it that are targeted. Call before wrapping the chunks for DDP (it
    buckets the parameters that require grad). Returns the spec export and load need.
    ValueError (before any change) for unknown targets, a rank above min(out, in) of a
    targeted projection, MoE MLP or MLA q/k/v targets, sequence parallelism.
    """
    if isinstance(targets, str):
        targets = (targets,)
    spec = LoraSpec(tuple(targets), rank, float(alpha), float(dropout))
    if not model_chunks:
        raise ValueError("model_chunks is empty")
    linears = targeted_linears(unwrap(model_chunks[0]).config, spec)
    for chunk in model_chunks:
        model = unwrap(chunk)
        model.requires_grad_(False)
        for layer in model.decoder.layers:
            for linear in linears:
                module = layer.get_submodule(linear.path)
                _attach(module, linear, spec, layer.layer_number - 1, seed)
    return spec
