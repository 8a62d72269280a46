"""Read a served LoRA adapter back from the slot the engine's LoRA kernels compute with.

For ``verify`` of adapter-only updates (``WeightSync.update_adapter``). vLLM keeps each loaded
adapter in a CPU cache and, while requests use it, copies it into a slot of every LoRA layer's
stacked buffers (``lora_a_stacked[i][slot]`` [max_rank, in], ``lora_b_stacked[i][slot]``
[out, max_rank], one ``i`` per packed q/k/v or gate/up part, ``lora_b`` already multiplied by
``alpha / r``): the punica kernels multiply with those buffers as they are. So the adapter is
put into its slot the way a request would put it there (loaded again if the CPU cache evicted
it), and the slot is read: A and B of every PEFT tensor on the probed columns, each rank's
shard with where it sits in the whole (``weightsync.probe.rows_piece`` / ``cols_piece``), and
a slot that holds values past the adapter's rank, or for a module the adapter does not
have, reads as a mismatch.

The worker knows adapters by the integer id the API server gave them, not by name:
``track_adapters`` records, in this worker process, the request each name was last loaded
with (vLLM's ``add_adapter`` / ``remove_adapter`` wrapped, nothing else changed), and
``forget`` drops a name the adapter unloaded through the API server.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from weightsync.engines.vllm_plugin.readback import held_columns, output_shard
from weightsync.probe import cols_piece, digest, probe_columns, probe_view, rows_piece

Piece = tuple[str, dict]

_LOADED: dict[str, tuple[object, object]] = {}
"""adapter name -> (the worker's LoRA manager, the LoRARequest it was loaded with)."""


def track_adapters() -> None:
    """Record which request each adapter name was loaded with (idempotent)."""
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    for cls in (WorkerLoRAManager, LRUCacheWorkerLoRAManager):
        if "add_adapter" in vars(cls) and not hasattr(cls.add_adapter, "_weightsync"):
            cls.add_adapter = _recording_add(cls.add_adapter)
        if "remove_adapter" in vars(cls) and not hasattr(cls.remove_adapter, "_weightsync"):
            cls.remove_adapter = _recording_remove(cls.remove_adapter)


def forget(name: str) -> bool:
    """The API server unloaded ``name`` (vLLM's unload never reaches the workers): it is not
    read back any more. Its CPU copy stays in vLLM's bounded cache, where running requests
    may still need it."""
    return _LOADED.pop(name, None) is not None


def _recording_add(add):
    @functools.wraps(add)
    def wrapper(self, request):
        loaded = add(self, request)
        _LOADED[request.lora_name] = (self, request)
        return loaded

    wrapper._weightsync = True
    return wrapper


def _recording_remove(remove):
    @functools.wraps(remove)
    def wrapper(self, adapter_id):
        for name in [n for n, (_, r) in _LOADED.items() if r.lora_int_id == adapter_id]:
            del _LOADED[name]
        return remove(self, adapter_id)

    wrapper._weightsync = True
    return wrapper


def activate(model: torch.nn.Module, name: str) -> tuple[object, int]:
    """Put adapter ``name`` into a LoRA slot as a request for it does (into the CPU cache
    again if it was evicted); its LoRAModel and the slot."""
    if name not in _LOADED:
        raise KeyError(f"adapter {name!r} is not loaded on this engine")
    manager, request = _LOADED[name]
    manager.add_adapter(request)  # vLLM's own add_lora does the same between two steps
    models = model.lora_manager
    if request.lora_int_id not in models.lora_index_to_id:  # a manager that only caches it
        models.activate_adapter(request.lora_int_id)
    slot = models.lora_index_to_id.index(request.lora_int_id)
    return models.get_adapter(request.lora_int_id), slot


def slot_pieces(model: torch.nn.Module, lora, slot: int, seed: int) -> dict[str, dict]:
    """``{peft_name: probe piece}`` of what this rank's LoRA ``slot`` holds for ``lora``."""
    models = model.lora_manager
    if models.lora_config.fully_sharded_loras:
        raise RuntimeError("verify: reading back fully sharded LoRA slots is not supported")
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    with torch.no_grad():
        return dict(_modules(models.modules, lora, slot, seed, packed))


def _modules(modules: dict, lora, slot: int, seed: int, packed: dict) -> Iterator[Piece]:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    for module_name, module in modules.items():
        if not isinstance(module, BaseLinearLayerWithLoRA):
            continue  # embeddings, the LM head, MoE experts: not LoRA targets we export
        parent, _, leaf = module_name.rpartition(".")
        n = len(module.lora_a_stacked)
        parts = packed.get(leaf, [leaf]) if n > 1 else [leaf]
        weights = lora.get_lora(module_name)
        has = _slices_present(weights, n)
        if len(parts) != n or len(has) != n:  # a packing this read-back does not know
            bad = {"digest": f"mismatch: {n} LoRA slices for {parts}, not read back"}
            yield f"base_model.model.{module_name}.lora_A.weight", bad
            continue
        for k, part in enumerate(parts):
            peft = f"base_model.model.{parent}.{part}" if parent else f"base_model.model.{part}"
            a_RI = module.lora_a_stacked[k][slot, 0]
            b_OR = module.lora_b_stacked[k][slot, 0]
            if not has[k]:
                if a_RI.any() or b_OR.any():
                    yield (
                        f"{peft}.lora_A.weight",
                        {"digest": "mismatch: slot holds a LoRA the adapter does not have"},
                    )
                continue
            yield from _slice(peft, module, k, a_RI, b_OR, weights.rank, seed)


def _slices_present(weights, n: int) -> list[bool]:
    if weights is None:
        return [False] * n
    if isinstance(weights.lora_a, list):
        return [a is not None for a in weights.lora_a]
    return [True] * n


def _slice(peft: str, module, k: int, a_RI, b_OR, rank: int, seed: int) -> Iterator[Piece]:
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

    if a_RI[rank:].any() or b_OR[:, rank:].any():
        bad = {"digest": f"mismatch: slot holds values past rank {rank}"}
        yield f"{peft}.lora_A.weight", bad
        yield f"{peft}.lora_B.weight", bad
        return
    a_RI, b_OR = a_RI[:rank], b_OR[:, :rank]
    base = module.base_layer
    if isinstance(base, RowParallelLinear):  # A holds this rank's input columns
        cols, local = held_columns(base, probe_columns(seed, base.input_size))
        if len(cols):
            piece = cols_piece(a_RI[:, local], cols.tolist(), base.input_size, seed)
            yield f"{peft}.lora_A.weight", piece
        yield f"{peft}.lora_B.weight", {"digest": digest(probe_view(b_OR, seed))}
        return
    yield f"{peft}.lora_A.weight", {"digest": digest(probe_view(a_RI, seed))}
    if isinstance(base, ColumnParallelLinear):  # B holds this rank's output rows
        start, total = output_shard(base, k, b_OR.shape[0])
        yield f"{peft}.lora_B.weight", rows_piece(probe_view(b_OR, seed), start, total)
    else:
        yield f"{peft}.lora_B.weight", {"digest": digest(probe_view(b_OR, seed))}
