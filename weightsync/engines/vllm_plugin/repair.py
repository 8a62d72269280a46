"""What vLLM's layerwise reload leaves undone, redone once a session is finalized.

Layerwise reload re-runs each *loaded* layer's post-processing on freshly materialized tensors
and copies the result into the layer's original storage. Two kinds of state escape it:

- **Aliases.** A tied ``lm_head`` shares its Parameter with ``embed_tokens`` but receives no
  tensor of its own, so it is never processed: on CPU its GEMM keeps the weight it packed at
  start-up (``cpu_linear`` holds a oneDNN/sgl-kernel copy) and the engine samples with the old
  head. Every module that shares a Parameter with a reloaded module is processed again.
- **Post-processing owned by the kernel.** The CPU MoE experts prepack ``w13``/``w2`` into a
  blocked layout in the *kernel's* ``process_weights_after_loading``, which vLLM runs once, when
  the kernel is built, not on a weight update. The reload copies checkpoint-layout bytes into
  storage the kernel reads as prepacked: every sync scrambles the experts. Each reloaded MoE
  layer's kernel post-processing is run again, exactly once.

``verify`` (``readback``) reads the weights back through the kernels, so a repair missed here
shows up there as a mismatch, not as silently wrong rollouts.
"""

from __future__ import annotations

import torch


def experts_kernel(module: torch.nn.Module):
    """The modular MoE kernel's experts object of a FusedMoE layer, else None."""
    kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
    return getattr(kernel, "fused_experts", None)


def alias_groups(model: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """Modules that share a Parameter object (a tied LM head and its embedding)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append(module)
    return [group for group in owners.values() if len(group) > 1]


class ReloadRepair:
    """Taken before ``initialize_layerwise_reload`` (which swaps parameters for meta tensors)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.aliases = alias_groups(model)
        self.moe = [m for m in model.modules() if experts_kernel(m) is not None]

    def reloaded(self) -> set[torch.nn.Module]:
        """Of the modules repairs may touch, those whose new weights the finalize will have
        processed: done during the session (their reload info was reset) or loaded in part
        (finalize processes them). Call after partial layers were discarded, before
        finalizing."""
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        watched = [m for group in self.aliases for m in group] + self.moe
        out = set()
        for m in watched:
            info = LAYERWISE_INFO.get(m)
            if info is not None and (not info.can_load() or info.load_numel > 0):
                out.add(m)
        return out

    def apply(self, reloaded: set[torch.nn.Module], skip_aliases: bool = False) -> None:
        """After finalize: process the aliases of reloaded modules, re-run the MoE kernels'
        post-processing of reloaded MoE layers."""
        if not skip_aliases:
            for group in self.aliases:
                if reloaded.intersection(group):
                    for m in group:
                        if m not in reloaded and hasattr(m, "quant_method"):
                            m.quant_method.process_weights_after_loading(m)
        for m in self.moe:
            if m in reloaded:
                experts_kernel(m).process_weights_after_loading(m)


def aliases(model: torch.nn.Module, expected: dict) -> dict[str, str]:
    """``{alias: checkpoint name}`` of every parameter the model computes with under a name
    the checkpoint does not have, found from the model itself: a Parameter shared by two
    modules (a tied head) or one module registered twice, whatever the names."""
    from weightsync.probe import logical_name

    names = {logical_name(n) for n in expected} - {None}
    by_param: dict[int, set[str]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        prefix = prefix.replace(".base_layer", "")
        for pname, param in module._parameters.items():
            if param is not None:
                by_param.setdefault(id(param), set()).add(f"{prefix}.{pname}" if prefix else pname)
    out = {}
    for full in by_param.values():
        sources = sorted(full & names)
        if len(full) > 1 and sources:
            out.update((n, sources[0]) for n in sorted(full - names))
    return out


def unloaded_layers(model: torch.nn.Module, repair: ReloadRepair | None) -> list[str]:
    """Layers of the open session that did not get every element they hold, by vLLM's own
    count (layerwise reload's ``load_numel``): finalizing would put their old weights back and
    only log it. Call before finalizing. A layer that got nothing but shares its
    parameters with one that loaded (a tied head) is that one's alias; the vocabulary's
    padding rows are never sent."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    def loaded(layer) -> bool:  # processed once complete (reset), or got elements
        info = LAYERWISE_INFO.get(layer)
        return info is None or not info.can_load() or info.load_numel > 0

    # A layer sharing its parameters with one that loaded (a tied head) is its alias.
    aliases = {
        m for group in (repair.aliases if repair else []) for m in group if any(map(loaded, group))
    }
    out = []
    for name, layer in model.named_modules():
        info = LAYERWISE_INFO.get(layer)
        if info is None or not info.can_load() or not info.load_numel_total:
            continue  # not reloaded, or processed once it had all its elements
        if (layer in aliases and info.load_numel == 0) or is_deferred_attention_layer(layer):
            continue  # attention layers hold no checkpoint weights here (scales at most)
        # Buffers (a rotary cache) are never sent: only the parameters count.
        params = sum(t.numel() for t in info.restore_metadata[0].values())
        if params and info.load_numel < _real_numel(layer, params):
            out.append(f"{name} ({info.load_numel} of {params} elements)")
    return out


def _real_numel(layer: torch.nn.Module, params: int) -> int:
    indices = getattr(layer, "shard_indices", None)  # VocabParallelEmbedding: padded rows
    if indices is None:
        return params
    return (indices.num_org_elements + indices.num_added_elements) * layer.embedding_dim


def unrepairable(model: torch.nn.Module) -> list[str]:
    """Layers whose post-processing after a reload neither vLLM's layerwise reload nor
    ``ReloadRepair`` is known to redo, by name and kind: an update would leave them computing
    with something other than what was sent, so the engine is refused before any pause. The
    reload re-runs each layer's own quant method; what a kernel owns is redone here for the
    modular MoE kernels only (``experts_kernel``)."""
    out = []
    for name, module in model.named_modules():
        if "w13_weight" in module._parameters and experts_kernel(module) is None:
            method = type(getattr(module, "quant_method", None)).__name__
            out.append(f"{name}: MoE experts without a modular kernel ({method})")
        impl = getattr(module, "impl", None)
        if type(impl).__module__.endswith(".amx_mla"):
            out.append(
                f"{name}: AMX_MLA attention prepacks kv_b_proj where vLLM's reload cannot "
                "restore it (serve with --attention-backend CPU_MLA)"
            )
    return out
