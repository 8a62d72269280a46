"""Core attention for multi-latent attention without TransformerEngine.

megatron-core 0.16.1's MLA passes ``k_channels``/``v_channels`` to its core attention, which only
TransformerEngine's attention accepts. The local ``DotProductAttention`` computes the same
softmax(q k^T * scale) v; it only sizes its output from ``kv_channels``. This subclass takes the
two head sizes and sizes the output from the value heads, so MLA runs on the local spec
(CPU included). It is used through the layer spec, not patched in.
"""

from __future__ import annotations

from typing import Any

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec


class MLADotProductAttention(DotProductAttention):
    def __init__(
        self, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        if v_channels is None:
            return  # the generic Attention base builds (then discards) one without head sizes
        # Keys carry as many heads as queries in MLA (no grouping); values are v_channels wide.
        self.num_query_groups_per_partition = self.num_attention_heads_per_partition
        self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


def use_local_mla_attention(layer_specs: list[ModuleSpec]) -> None:
    """Point every MLA layer's core attention at ``MLADotProductAttention`` (in place)."""
    for spec in layer_specs:
        attention = spec.submodules.self_attention.submodules
        if attention.core_attention is DotProductAttention:
            attention.core_attention = MLADotProductAttention
