"""Read the served model's weights back the way its kernels see them, under HF names.

For ``verify`` (see ``weightsync.proof``): after an update is finalized, every weight the
checkpoint names is read back from the live model, on the probed columns (``sample``) or all
of them in chunks (``full``), and fingerprinted where it sits in the whole weight:

- linear layers (fused qkv / gate_up included, int4 WNA16 included) and the LM head: through
  their own GEMM, fed one-hot rows, so a repacked, prepacked or stale kernel copy is what is
  read; fused outputs are split back into the checkpoint's q/k/v or gate/up by the layer's own
  ``output_partition_sizes`` and the model's ``packed_modules_mapping``;
- a tied LM head (any alias: ``aliases``) is read through its own kernel under its own name;
- MoE experts: ``w13``/``w2`` mapped back from the kernel's layout (the CPU kernel's prepack is
  a permutation, learned once per shape by prepacking index digits);
- MLA's decode copies (``W_UK_T``, ``W_UV``, which the attention layer derives from
  ``kv_b_proj`` and multiplies with when decoding): as they are, under
  ``<kv_b_proj>.weight#decode``, fingerprinted as the kv_b_proj rows they were cut from;
- everything else (norms, embeddings, biases): the live parameter itself.

The pieces read are hashed in batches (``proof.partials``): a layer's q_proj in every layer
is one group, so the per-weight cost is a few ops, not a few dozen.

On a TP>1 engine each rank fingerprints its own shard with the global row/column keys
(column-parallel layers and the vocab hold output rows, row-parallel layers input columns);
the driver adds the ranks' parts (``weightsync.proof.assemble``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import torch

from weightsync.engines.vllm_plugin.repair import experts_kernel
from weightsync.proof import DERIVED, Piece, Probe, combine, partials

Part = tuple[str, str, Piece]  # (weight name, where it sits, the elements read)
_CHUNK = 256  # one-hot rows per kernel call at level full: bounds the read's memory
_BATCH = 1 << 22  # elements read before they are hashed (together: few ops per weight)


def live_parts(
    model: torch.nn.Module, probe: Probe, wanted: set[str]
) -> dict[str, dict[str, dict]]:
    """``{hf_name: {where: part}}`` of every weight in ``wanted`` this rank holds."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    out: dict[str, dict[str, dict]] = {}
    pending: list[Part] = []

    def flush() -> None:
        parts = partials([p for *_, p in pending], probe)
        for (name, key, _), part in zip(pending, parts, strict=True):
            keyed = out.setdefault(name, {})
            keyed[key] = combine([keyed[key], part]) if key in keyed else part
        pending.clear()

    held = 0
    # Where a module sits under its checkpoint name (MLA's decode copies hang off kv_b_proj).
    hf = {
        id(m): p for p, m in model.named_modules(remove_duplicate=False) if f"{p}.weight" in wanted
    }
    # inference_mode: no autograd bookkeeping per op (the read-back is many small ops).
    with torch.inference_mode():
        # A module registered twice (a head tied as a module) is read under each name.
        for prefix, module in model.named_modules(remove_duplicate=False):
            # An engine serving LoRA wraps each layer and keeps it as ``<layer>.base_layer``.
            prefix = prefix.replace(".base_layer", "")
            for name, key, piece in _read(prefix, module, probe, packed, hf):
                if name.partition(DERIVED)[0] in wanted:
                    pending.append((name, key, piece))
                    held += piece.w_RC.numel()
                    if held > _BATCH:
                        flush()
                        held = 0
        flush()
        # An alias no kernel reads under its own name (a router's expert-score bias shared
        # with the experts module): its live parameter as it is.
        for name, param in model.named_parameters(remove_duplicate=False):
            name = name.replace(".base_layer", "")
            if name in wanted and name not in out:
                pending.append((name, "all", _whole(param.data, probe, name)))
                flush()
    return out


def _read(
    prefix: str, module: torch.nn.Module, probe: Probe, packed: dict, hf: dict[int, str]
) -> Iterator[Part]:
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    if isinstance(module, LinearBase):
        yield from _linear(prefix, module, probe, packed)
        yield from _plain(
            prefix, module, probe, skip=lambda n: n == "bias" or n.startswith("weight")
        )
    elif isinstance(module, VocabParallelEmbedding):
        # vLLM pads the vocabulary before cutting it: a rank may hold none of the real rows.
        # It still reports its (empty) part, or the alias fallback in ``live_parts`` would
        # read its padding rows as the whole weight.
        yield from _vocab(f"{prefix}.weight", module, probe, isinstance(module, ParallelLMHead))
    # Its own parameters: a LoRA wrapper forwards attribute reads to its base layer, which
    # is read under the same name already.
    elif "w13_weight" in module._parameters and "w2_weight" in module._parameters:
        yield from _experts(prefix, module, probe)
    elif hasattr(module, "W_UK_T") and hasattr(module, "W_UV") and id(module.kv_b_proj) in hf:
        yield from _mla_decode(module, probe, hf[id(module.kv_b_proj)])
    else:
        yield from _plain(prefix, module, probe)


def _plain(prefix: str, module, probe: Probe, skip=lambda name: False) -> Iterator[Part]:
    """The module's own parameters as they are, held whole (a router's expert-score bias
    rides on the gate's linear layer)."""
    for pname, param in module._parameters.items():
        if param is not None and not skip(pname):
            yield f"{prefix}.{pname}", "all", _whole(param.data, probe, f"{prefix}.{pname}")


def _whole(w: torch.Tensor, probe: Probe, name: str) -> Piece:
    if w.dim() < 2:
        return Piece(w, name, (0, 1), torch.arange(w.numel()), w.numel())
    w_RI = w.reshape(-1, w.shape[-1])
    cols = _cols(probe, name, w_RI.shape[1], 0, w_RI.shape[1])
    w_RC = w_RI.index_select(1, cols.to(w.device))
    return Piece(w_RC, name, (0, w_RI.shape[0]), cols, w.shape[-1])


def _cols(probe: Probe, name: str, total: int, start: int, n: int) -> torch.Tensor:
    """The probed global columns of ``name`` in ``[start, start + n)``."""
    cols = probe.columns(name, total)
    if cols is None:
        return torch.arange(start, start + n)
    return cols[(cols >= start) & (cols < start + n)]


def _through_kernel(module: torch.nn.Module, in_features: int, cols_C: torch.Tensor):
    """Columns ``cols_C`` (of this rank's ``in_features``) of the weight the module's GEMM
    uses, as [out, C]: one-hot rows in, so each output row is one weight column, exactly.
    Built on the module's device (a GPU engine reads on its GPU)."""
    dtype, device = _act_dtype(module)
    x_CI = torch.zeros(len(cols_C), in_features, dtype=dtype, device=device)
    x_CI[torch.arange(len(cols_C), device=device), cols_C.to(device)] = 1
    y_CO = module.quant_method.apply(module, x_CI, bias=None)
    return y_CO.t().to(dtype)


def _chunks(local: torch.Tensor) -> Iterator[torch.Tensor]:
    for s in range(0, len(local), _CHUNK):
        yield local[s : s + _CHUNK]


def _act_dtype(module: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    params = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
    scales = [p for n, p in module.named_parameters(recurse=False) if n == "weight_scale"]
    chosen = scales or params
    anyp = next(module.parameters(recurse=False), None)
    device = anyp.device if anyp is not None else torch.device("cpu")
    return (chosen[0].dtype if chosen else torch.get_default_dtype()), device


def _vocab(name: str, module, probe: Probe, is_head: bool) -> Iterator[Part]:
    """This rank's rows of the vocabulary (the padding left out)."""
    idx = module.shard_indices
    n, dim = idx.num_org_elements, module.embedding_dim
    rows = (idx.org_vocab_start_index, module.org_vocab_size)
    key = f"r{rows[0]}+{n}"
    cols = _cols(probe, name, dim, 0, dim)
    for chunk in _chunks(cols) if is_head else [cols]:
        if is_head:  # through the head's own kernel: a tied head's alias is what is read
            w_RC = _through_kernel(module, dim, chunk)[:n]
        else:
            w_RC = module.weight[:n].index_select(1, chunk.to(module.weight.device))
        yield name, key, Piece(w_RC, name, rows, chunk, dim)


def _linear(prefix: str, module, probe: Probe, packed: dict) -> Iterator[Part]:
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    parent, _, leaf = prefix.rpartition(".")
    # ReplicatedLinear subclasses (the MoE router) keep only the unsharded sizes.
    sizes = list(getattr(module, "output_partition_sizes", None) or [module.output_size])
    parts = packed.get(leaf, [leaf]) if len(sizes) > 1 else [leaf]
    if len(parts) != len(sizes):
        parts, sizes = [leaf], [sum(sizes)]
    names = [f"{parent}.{p}.weight" if parent else f"{p}.weight" for p in parts]
    if isinstance(module, RowParallelLinear):
        yield from _row_parallel(names[0], module, probe)
        return
    in_features = getattr(module, "input_size_per_partition", None) or module.input_size
    sharded = isinstance(module, ColumnParallelLinear)  # not ReplicatedLinear (the router)
    where = [
        output_shard(module, k, sizes[k]) if sharded else (0, sizes[k]) for k in range(len(sizes))
    ]
    # The parts of a fused layer probe different columns: each part's one-hot rows follow
    # the last part's, so its columns are a slice of the output (no search); at ``full`` the
    # parts share every column and are read once.
    wanted = [_cols(probe, n, in_features, 0, in_features) for n in names]
    shared = all(torch.equal(w, wanted[0]) for w in wanted)
    ones = wanted[0] if shared else torch.cat(wanted)
    segments = [0] * len(names) if shared else [0, *itertools.accumulate(map(len, wanted))][:-1]
    for s in range(0, len(ones), _CHUNK):
        chunk = ones[s : s + _CHUNK]
        w_OC = _through_kernel(module, in_features, chunk).split(sizes)
        for name, w_RC, cols, seg, (start, total) in zip(
            names, w_OC, wanted, segments, where, strict=True
        ):
            lo, hi = max(seg, s), min(seg + len(cols), s + len(chunk))
            if lo < hi:
                piece = Piece(
                    w_RC[:, lo - s : hi - s], name, (start, total), ones[lo:hi], in_features
                )
                yield name, f"r{start}+{len(w_RC)}", piece
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        # The CPU GEMM may keep the bias in fp32: the checkpoint's dtype is what was sent.
        dtype, _ = _act_dtype(module)
        for name, b, (start, total) in zip(names, bias.split(sizes), where, strict=True):
            bname = name.removesuffix(".weight") + ".bias"
            cols = torch.arange(start, start + len(b))
            yield (
                bname,
                f"r{start}+{len(b)}",
                Piece(b.to(dtype), bname, (0, 1), cols, total),
            )


def output_shard(module, part: int, size: int) -> tuple[int, int]:
    """Where this rank's rows of output ``part`` start in the whole part, and its size.
    QKV's k and v are replicated over ``num_kv_head_replicas`` ranks when there are fewer
    KV heads than ranks (vLLM's own ``shard_rank``)."""
    tp_rank, tp_size = getattr(module, "tp_rank", 0), getattr(module, "tp_size", 1)
    replicas = getattr(module, "num_kv_head_replicas", 1) if part > 0 else 1
    return (tp_rank // replicas) * size, size * (tp_size // replicas)


def held_columns(module, probed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the ``probed`` input columns (global, ascending; None: all) of row-parallel
    ``module``, those this rank holds, and where they sit in its shard."""
    per_rank = module.input_size_per_partition
    start = module.tp_rank * per_rank
    if probed is None:
        cols = torch.arange(start, start + per_rank)
    else:
        cols = probed[(probed >= start) & (probed < start + per_rank)]
    return cols, cols - start


def _row_parallel(name: str, module, probe: Probe) -> Iterator[Part]:
    """Input columns are sharded: read the probed ones this rank holds."""
    cols, local = held_columns(module, probe.columns(name, module.input_size))
    per_rank = module.input_size_per_partition
    key = f"c{module.tp_rank * per_rank}+{per_rank}"
    for s in range(0, len(local), _CHUNK):
        w_OC = _through_kernel(module, per_rank, local[s : s + _CHUNK])
        yield (
            name,
            key,
            Piece(w_OC, name, (0, w_OC.shape[0]), cols[s : s + _CHUNK], module.input_size),
        )
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):  # not sharded: every rank adds it after the reduce
        bname = name.removesuffix(".weight") + ".bias"
        yield bname, "all", _whole(bias.to(_act_dtype(module)[0]), probe, bname)


def _mla_decode(module, probe: Probe, kv_b_proj: str) -> Iterator[Part]:
    """MLA's decode copies of ``kv_b_proj``, derived when the layer is finalized (``W_UK_T``
    [heads, nope, L] and ``W_UV`` [heads, L, v], this rank's heads): read as they are, and
    fingerprinted as the rows of kv_b_proj ([heads x (nope + v), L]) they were cut from,
    under ``<kv_b_proj>.weight#decode``, which must equal kv_b_proj's own fingerprint."""
    name = f"{kv_b_proj}.weight"
    heads, nope, v_dim = module.num_heads, module.qk_nope_head_dim, module.v_head_dim
    tp_rank = getattr(module.kv_b_proj, "tp_rank", 0)
    total = heads * getattr(module.kv_b_proj, "tp_size", 1) * (nope + v_dim)
    head_rows = (tp_rank * heads + torch.arange(heads))[:, None] * (nope + v_dim)
    uk_XL, uv_XL = module.W_UK_T, module.W_UV.transpose(1, 2)  # [heads, rows, L] both
    width = uk_XL.shape[-1]
    cols = _cols(probe, name, width, 0, width)
    for part, w_NXL, offset in (("k", uk_XL, 0), ("v", uv_XL, nope)):
        row_ids = (head_rows + offset + torch.arange(w_NXL.shape[1])).reshape(-1)
        w_RL = w_NXL.reshape(-1, width)
        key = f"{part}{tp_rank * heads}+{heads}"
        for chunk in _chunks(cols):
            w_RC = w_RL.index_select(1, chunk.to(w_RL.device))
            yield (
                f"{name}{DERIVED}decode",
                key,
                Piece(w_RC, name, (0, total), chunk, width, row_ids),
            )


def _experts(prefix: str, module, probe: Probe) -> Iterator[Part]:
    # The weights may sit on a child of the checkpoint's ``mlp.experts`` (vLLM's routed-experts
    # module): the HF names hang off the ``experts`` level.
    cut = prefix.find(".experts")
    prefix = prefix[: cut + len(".experts")] if cut >= 0 else prefix
    tp_rank, tp_size = _moe_tp(module)
    w13_EJH, w2_EHI = _model_layout(module)
    inter, hidden = w2_EHI.shape[-1], w2_EHI.shape[-2]  # this rank's share of intermediate
    start, total = tp_rank * inter, inter * tp_size
    rows, key = (start, total), f"r{start}+{inter}"
    for e in range(w13_EJH.shape[0]):
        for proj, w in (("gate_proj", w13_EJH[e, :inter]), ("up_proj", w13_EJH[e, inter:])):
            name = f"{prefix}.{e}.{proj}.weight"
            cols = _cols(probe, name, hidden, 0, hidden)
            w_RC = w.index_select(1, cols.to(w.device))
            yield name, key, Piece(w_RC, name, rows, cols, hidden)
        name = f"{prefix}.{e}.down_proj.weight"
        cols = _cols(probe, name, total, start, inter)
        down = w2_EHI[e].index_select(1, (cols - start).to(w2_EHI.device))
        yield name, f"c{start}+{inter}", Piece(down, name, (0, hidden), cols, total)


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
