"""Read the served model's weights back the way its kernels see them, under HF names.

For ``verify`` (see ``weightsync.probe``): after an update is finalized, every weight the
checkpoint names is read back from the live model, on its probed columns:

- linear layers (fused qkv / gate_up included, int4 WNA16 included) and the LM head: through
  their own GEMM, fed one-hot rows, so a repacked, prepacked or stale kernel copy is what is
  read; fused outputs are split back into the checkpoint's q/k/v or gate/up by the layer's own
  ``output_partition_sizes`` and the model's ``packed_modules_mapping``;
- a tied LM head is read through its own kernel and reported as ``lm_head.weight``;
- MoE experts: ``w13``/``w2`` mapped back from the kernel's layout (the CPU kernel's prepack is
  a permutation, learned once per shape by prepacking index digits);
- everything else (norms, embeddings, biases): the live parameter itself.

On a TP>1 engine each rank reads its own shard and says where it sits in the whole weight
(``weightsync.probe.rows_piece`` / ``cols_piece``): column-parallel layers and the vocab hold
output rows, row-parallel layers input columns; the driver puts the ranks' pieces together.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch

from weightsync.engines.vllm_plugin.repair import experts_kernel
from weightsync.probe import cols_piece, digest, probe_columns, probe_view, rows_piece

Piece = tuple[str, dict]


def live_pieces(model: torch.nn.Module, seed: int, wanted: set[str]) -> dict[str, dict]:
    """``{hf_name: probe piece}`` of every weight in ``wanted`` this rank holds."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    with torch.no_grad():
        return {
            name: piece
            for prefix, module in model.named_modules()
            # An engine serving LoRA wraps each layer and keeps it as ``<layer>.base_layer``.
            for name, piece in _read(prefix.replace(".base_layer", ""), module, seed, packed)
            if name in wanted
        }


def _read(prefix: str, module: torch.nn.Module, seed: int, packed: dict) -> Iterator[Piece]:
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    if isinstance(module, LinearBase):
        yield from _linear(prefix, module, seed, packed)
        yield from _plain(
            prefix, module, seed, skip=lambda n: n == "bias" or n.startswith("weight")
        )
    elif isinstance(module, VocabParallelEmbedding):
        # vLLM pads the vocabulary before cutting it: a rank may hold none of the real rows.
        if module.shard_indices.num_org_elements > 0:
            yield f"{prefix}.weight", _vocab(module, seed, isinstance(module, ParallelLMHead))
    elif hasattr(module, "w13_weight") and hasattr(module, "w2_weight"):
        yield from _experts(prefix, module, seed)
    else:
        yield from _plain(prefix, module, seed)


def _plain(prefix: str, module, seed: int, skip=lambda name: False) -> Iterator[Piece]:
    """The module's own parameters as they are (a router's expert-score bias rides on the
    gate's linear layer)."""
    for pname, param in module._parameters.items():
        if param is not None and not skip(pname):
            yield f"{prefix}.{pname}", {"digest": digest(probe_view(param, seed))}


def _through_kernel(module: torch.nn.Module, in_features: int, cols_C: torch.Tensor):
    """Columns ``cols_C`` (of this rank's ``in_features``) of the weight the module's GEMM
    uses, as [out, C]: one-hot rows in, so each output row is one weight column, exactly."""
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


def _vocab(module, seed: int, is_head: bool) -> dict:
    """This rank's rows of the vocabulary (the padding left out)."""
    idx = module.shard_indices
    n = idx.num_org_elements
    if is_head:  # through the head's own kernel: a tied head's alias is what is read
        w_OC = _through_kernel(
            module, module.embedding_dim, probe_columns(seed, module.embedding_dim)
        )
    else:
        w_OC = probe_view(module.weight, seed)
    return rows_piece(w_OC[:n], idx.org_vocab_start_index, module.org_vocab_size)


def _linear(prefix: str, module, seed: int, packed: dict) -> Iterator[Piece]:
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    parent, _, leaf = prefix.rpartition(".")
    # ReplicatedLinear subclasses (the MoE router) keep only the unsharded sizes.
    sizes = list(getattr(module, "output_partition_sizes", None) or [module.output_size])
    parts = packed.get(leaf, [leaf]) if len(sizes) > 1 else [leaf]
    if len(parts) != len(sizes):
        parts, sizes = [leaf], [sum(sizes)]
    names = [f"{parent}.{p}" if parent else p for p in parts]
    if isinstance(module, RowParallelLinear):
        yield from _row_parallel(names[0], module, seed)
        return
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    w_OC = _through_kernel(module, in_features, probe_columns(seed, in_features))
    bias = getattr(module, "bias", None)
    sharded = isinstance(module, ColumnParallelLinear)  # not ReplicatedLinear (the router)
    for k, (name, w) in enumerate(zip(names, w_OC.split(sizes), strict=True)):
        start, total = output_shard(module, k, sizes[k]) if sharded else (0, sizes[k])
        yield f"{name}.weight", rows_piece(w, start, total)
        if isinstance(bias, torch.Tensor):
            # The CPU GEMM may keep the bias in fp32: the checkpoint's dtype is what was sent.
            b = bias.split(sizes)[k].to(w_OC.dtype)
            yield f"{name}.bias", rows_piece(b, start, total)


def output_shard(module, part: int, size: int) -> tuple[int, int]:
    """Where this rank's rows of output ``part`` start in the whole part, and its size.
    QKV's k and v are replicated over ``num_kv_head_replicas`` ranks when there are fewer
    KV heads than ranks (vLLM's own ``shard_rank``)."""
    tp_rank, tp_size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    replicas = getattr(module, "num_kv_head_replicas", 1) if part > 0 else 1
    return (tp_rank // replicas) * size, size * (tp_size // replicas)


def held_columns(module, seed: int) -> tuple[list[int], torch.Tensor]:
    """The probed input columns of row-parallel ``module`` this rank holds: their global
    indices (ascending) and where they sit in its shard."""
    per_rank = module.input_size_per_partition
    start = module.tp_rank * per_rank
    probed = probe_columns(seed, module.input_size).tolist()
    cols = [c for c in probed if start <= c < start + per_rank]
    return cols, torch.tensor(cols, dtype=torch.long) - start


def _row_parallel(name: str, module, seed: int) -> Iterator[Piece]:
    """Input columns are sharded: read the probed ones this rank holds."""
    cols, local = held_columns(module, seed)
    if cols:
        w_OC = _through_kernel(module, module.input_size_per_partition, local)
        yield f"{name}.weight", cols_piece(w_OC, cols, module.input_size, seed)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):  # not sharded: every rank adds it after the reduce
        yield f"{name}.bias", {"digest": digest(bias.to(_act_dtype(module)))}


def _experts(prefix: str, module, seed: int) -> Iterator[Piece]:
    # The weights may sit on a child of the checkpoint's ``mlp.experts`` (vLLM's routed-experts
    # module): the HF names hang off the ``experts`` level.
    cut = prefix.find(".experts")
    prefix = prefix[: cut + len(".experts")] if cut >= 0 else prefix
    tp_rank, tp_size = _moe_tp(module)
    w13_EJH, w2_EHI = _model_layout(module)
    inter = w2_EHI.shape[-1]  # this rank's share of the intermediate size
    start, total = tp_rank * inter, inter * tp_size
    cols = [c for c in probe_columns(seed, total).tolist() if start <= c < start + inter]
    local = torch.tensor(cols, dtype=torch.int64) - start
    for e in range(w13_EJH.shape[0]):
        gate, up = w13_EJH[e, :inter], w13_EJH[e, inter : 2 * inter]
        yield f"{prefix}.{e}.gate_proj.weight", rows_piece(probe_view(gate, seed), start, total)
        yield f"{prefix}.{e}.up_proj.weight", rows_piece(probe_view(up, seed), start, total)
        if cols:
            down = w2_EHI[e][:, local]
            yield f"{prefix}.{e}.down_proj.weight", cols_piece(down, cols, total, seed)


def _moe_tp(module) -> tuple[int, int]:
    """The experts' TP rank and size; expert parallelism (experts split across ranks) is not
    read back: a rank would hold only some experts."""
    config = getattr(getattr(module, "moe_config", None), "moe_parallel_config", None)
    if config is None:
        return 0, 1
    if config.use_ep:
        raise RuntimeError("verify: reading back expert-parallel MoE layers is not supported")
    return config.tp_rank, config.tp_size


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
