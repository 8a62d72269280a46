"""Read the served model's weights back the way its kernels see them, under HF names.

For ``verify`` (see ``weightsync.probe``): after an update is finalized, every weight the
checkpoint names is read back from the live model and digested on its probed columns:

- linear layers (fused qkv / gate_up included, int4 WNA16 included) and the LM head: through
  their own GEMM, fed one-hot rows, so a repacked, prepacked or stale kernel copy is what is
  read; fused outputs are split back into the checkpoint's q/k/v or gate/up by the layer's own
  ``output_partition_sizes`` and the model's ``packed_modules_mapping``;
- a tied LM head is read through its own kernel and reported as ``lm_head.weight``;
- MoE experts: ``w13``/``w2`` mapped back from the kernel's layout (the CPU kernel's prepack is
  a permutation, learned once per shape by prepacking index digits);
- everything else (norms, embeddings, biases): the live parameter itself.

Engines with TP=1 only: a sharded engine holds shards, not the checkpoint's tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from weightsync.engines.vllm_plugin.repair import experts_kernel
from weightsync.probe import digest, probe_columns, probe_view

Probe = tuple[str, torch.Tensor]


def live_digests(model: torch.nn.Module, seed: int, wanted: set[str]) -> dict[str, str]:
    """``{hf_name: probe digest}`` of every weight in ``wanted`` that the model holds."""
    out: dict[str, str] = {}
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for name, probed in _read(prefix, module, seed, packed):
                if name in wanted:
                    out[name] = digest(probed)
    return out


def _read(prefix: str, module: torch.nn.Module, seed: int, packed: dict) -> Iterator[Probe]:
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    if isinstance(module, LinearBase):
        yield from _linear(prefix, module, seed, packed)
    elif isinstance(module, ParallelLMHead):
        w_OC = _through_kernel(module, module.embedding_dim, seed)
        yield f"{prefix}.weight", w_OC[: module.org_vocab_size]
    elif isinstance(module, VocabParallelEmbedding):
        yield f"{prefix}.weight", probe_view(module.weight[: module.org_vocab_size], seed)
    elif hasattr(module, "w13_weight") and hasattr(module, "w2_weight"):
        yield from _experts(prefix, module, seed)
    else:
        for pname, param in module._parameters.items():
            if param is not None:
                yield f"{prefix}.{pname}", probe_view(param, seed)


def _through_kernel(module: torch.nn.Module, in_features: int, seed: int) -> torch.Tensor:
    """Columns ``probe_columns(seed, in_features)`` of the weight the module's GEMM uses, as
    [out, C]: one-hot rows in, so each output row is one weight column, exactly."""
    cols_C = probe_columns(seed, in_features)
    dtype = _act_dtype(module)
    x_CI = torch.zeros(len(cols_C), in_features, dtype=dtype)
    x_CI[torch.arange(len(cols_C)), cols_C] = 1
    y_CO = module.quant_method.apply(module, x_CI, bias=None)
    return y_CO.t().to(dtype)


def _act_dtype(module: torch.nn.Module) -> torch.dtype:
    params = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    scales = [p for n, p in module.named_parameters(recurse=False) if n == "weight_scale"]
    chosen = scales or params
    return chosen[0].dtype if chosen else torch.get_default_dtype()


def _linear(prefix: str, module, seed: int, packed: dict) -> Iterator[Probe]:
    parent, _, leaf = prefix.rpartition(".")
    # ReplicatedLinear subclasses (the MoE router) keep only the unsharded sizes.
    sizes = list(getattr(module, "output_partition_sizes", None) or [module.output_size])
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    parts = packed.get(leaf, [leaf]) if len(sizes) > 1 else [leaf]
    if len(parts) != len(sizes):
        parts = [leaf]
        sizes = [sum(sizes)]
    names = [f"{parent}.{p}" if parent else p for p in parts]
    w_OC = _through_kernel(module, in_features, seed)
    for name, w in zip(names, w_OC.split(sizes), strict=True):
        yield f"{name}.weight", w
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        # The CPU GEMM may keep the bias in fp32: the checkpoint's dtype is what was sent.
        for name, b in zip(names, bias.split(sizes), strict=True):
            yield f"{name}.bias", b.to(w_OC.dtype)


def _experts(prefix: str, module, seed: int) -> Iterator[Probe]:
    # The weights may sit on a child of the checkpoint's ``mlp.experts`` (vLLM's routed-experts
    # module): the HF names hang off the ``experts`` level.
    cut = prefix.find(".experts")
    prefix = prefix[: cut + len(".experts")] if cut >= 0 else prefix
    w13_EJH, w2_EHI = _model_layout(module)
    inter = w2_EHI.shape[-1]
    for e in range(w13_EJH.shape[0]):
        gate, up = w13_EJH[e, :inter], w13_EJH[e, inter : 2 * inter]
        yield f"{prefix}.{e}.gate_proj.weight", probe_view(gate, seed)
        yield f"{prefix}.{e}.up_proj.weight", probe_view(up, seed)
        yield f"{prefix}.{e}.down_proj.weight", probe_view(w2_EHI[e], seed)


def _model_layout(module) -> tuple[torch.Tensor, torch.Tensor]:
    experts = experts_kernel(module)
    isa = getattr(experts, "isa", None)
    w13, w2 = module.w13_weight.data, module.w2_weight.data
    if isa is None or getattr(experts, "_use_zentorch", False):
        return w13, w2
    return _unprepack(w13, isa), _unprepack(w2, isa)


def _unprepack(packed: torch.Tensor, isa: str) -> torch.Tensor:
    src = _prepack_source(tuple(packed.shape), packed.dtype, isa)
    out = torch.empty(packed.numel(), dtype=packed.dtype)
    out[src] = packed.reshape(-1)
    return out.view(packed.shape)


@functools.cache
def _prepack_source(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """For each position of the CPU MoE prepack's output, the flat index it came from.
    Learned by prepacking base-256 digits of the indices (exact in bf16), then checked to be a
    pure permutation: anything else cannot be read back and fails verify loudly."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    n = math.prod(shape)
    index = torch.arange(n)
    src = torch.zeros(n, dtype=torch.int64)
    for k in range(max(1, math.ceil(math.log(n, 256)))):
        digits = ((index >> (8 * k)) & 255).to(dtype).view(shape)
        src |= cpu_prepack_moe_weight(digits, isa).reshape(-1).to(torch.int64) << (8 * k)
    probe = torch.randn(shape).to(dtype)
    if not torch.equal(cpu_prepack_moe_weight(probe, isa).reshape(-1), probe.reshape(-1)[src]):
        raise RuntimeError(f"the CPU MoE prepack ({isa}) is not a permutation: cannot read back")
    return src
