"""Build megatron-core GPTModel chunks from an HF config (local spec: no TransformerEngine/Apex)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import MLATransformerConfig, TransformerConfig

from megatron_bridge.families import get_family
from megatron_bridge.families.base import rope_theta
from megatron_bridge.mla import use_local_mla_attention


def as_hf_config(hf_config: Any) -> Any:
    """Accept a transformers ``PretrainedConfig`` or its ``to_dict()``."""
    if isinstance(hf_config, Mapping):
        from transformers import AutoConfig

        if "model_type" not in hf_config:
            raise ValueError("hf_config dict has no 'model_type'")
        fields = {k: v for k, v in hf_config.items() if k != "model_type"}
        return AutoConfig.for_model(hf_config["model_type"], **fields)
    return hf_config


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


# The only scaled rotary embedding megatron's GPTModel implements (Llama 3.x), with its
# hard-wired constants.
_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def rope_scaling_kwargs(cfg: Any) -> dict[str, Any]:
    """GPTModel rotary-scaling arguments for ``cfg.rope_parameters`` (MLA families do their own)."""
    rope = cfg.rope_parameters or {}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind == "llama3" and all(rope.get(k) == v for k, v in _LLAMA3_FIXED.items()):
        return {"rope_scaling": True, "rope_scaling_factor": float(rope["factor"])}
    raise ValueError(
        f"rope_parameters {rope} are not supported: only 'default' and 'llama3' "
        f"with {_LLAMA3_FIXED}"
    )


def transformer_config(
    hf_config: Any, *, params_dtype: torch.dtype = torch.float32, **overrides: Any
) -> TransformerConfig:
    """The megatron TransformerConfig for ``hf_config`` under the current parallel_state."""
    cfg = as_hf_config(hf_config)
    kwargs = get_family(cfg).transformer_kwargs(cfg)
    cls = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    kwargs |= dict(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=False,  # torch norms (local spec) cannot run sequence parallel
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=True,  # shards cut from one master weight: TP-invariant init
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )
    return cls(**(kwargs | overrides))


def build_model(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    vocab_divisible_by: int = 128,
    max_sequence_length: int | None = None,
    parallel_output: bool = True,
    **config_overrides: Any,
) -> list[GPTModel]:
    """GPTModel chunk(s) of this rank: one per virtual pipeline stage (one without VPP).

    ``config_overrides`` go to the TransformerConfig (e.g. ``moe_token_dispatcher_type``).
    The vocabulary is padded to a multiple of ``vocab_divisible_by * tp``; the exporter trims it.
    Chunks live on the current CUDA device when there is one, else on the CPU.
    """
    cfg = as_hf_config(hf_config)
    mla = get_family(cfg).transformer_kwargs(cfg).get("multi_latent_attention", False)
    rope = {} if mla else rope_scaling_kwargs(cfg)
    config = transformer_config(cfg, params_dtype=params_dtype, **config_overrides)
    vocab = padded_vocab_size(cfg.vocab_size, vocab_divisible_by, config.tensor_model_parallel_size)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=stage
        )
        if config.multi_latent_attention:
            use_local_mla_attention(spec.layer_specs)
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=vocab,
                max_sequence_length=max_sequence_length or cfg.max_position_embeddings,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                parallel_output=parallel_output,
                share_embeddings_and_output_weights=bool(cfg.tie_word_embeddings),
                position_embedding_type="rope",
                rotary_base=rope_theta(cfg),
                **rope,
                vp_stage=stage,
            )
        )
    # Torch norms (local spec) are created in fp32 whatever params_dtype says; cast parameters
    # like megatron's Float16Module does, so a model has one dtype the export metadata can name.
    # Buffers keep theirs (the router's expert_bias stays fp32 by design).
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    )
    for chunk in chunks:
        for param in chunk.parameters():
            param.data = param.data.to(params_dtype)
        if device is not None:
            chunk.to(device)  # use_cpu_initialization builds on the host; train on the GPU
    return chunks
