"""The trainer: a megatron-core policy on each Ray actor (TP-sharded), GRPO updates.

Parameters are bf16, as the engine serves them, so the exporter sends exactly what the forward
used; fp32 master copies take the Adam updates and are rounded back into the parameters after
every step (megatron's mixed-precision scheme, without its distributed optimizer).

Shapes: B sequences, S tokens per sequence, R response tokens, V/tp local vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from weightsync.quant import Int4Config
from weightsync.ray_group import TrainerWorker


class PolicyWorker(TrainerWorker):
    """Call its methods on every rank with ``group.run_all(PolicyWorker.method, ...)``."""

    def build_policy(
        self,
        hf_weights: Mapping[str, torch.Tensor],
        hf_config: dict,
        lr: float,
        int4: Int4Config | None,
        tp: int,
        lora: tuple[int, float] | None = None,
    ) -> int:
        """Build this rank's shards from HF tensors; returns the local parameter count.

        The tensors travel with the call (not as a path): on a multi-node cluster the
        driver's files are not on the actors' nodes. ``lora`` (rank, alpha): train LoRA
        adapters on every projection only; the base is frozen."""
        import megatron_bridge

        self.hf_config = hf_config
        # vocab_divisible_by=1: no padded logits that the engine's softmax would not have.
        self.model_chunks = megatron_bridge.build_model(
            hf_config, params_dtype=torch.bfloat16, vocab_divisible_by=1
        )
        self.params = [p for c in self.model_chunks for p in c.parameters()]
        # The local spec's torch norms ignore params_dtype (fp32), and the exporter wants one
        # dtype: cast parameters only (the rotary inv_freq buffer stays fp32, as in vLLM).
        for p in self.params:
            p.data = p.data.to(torch.bfloat16)
        megatron_bridge.load_hf_weights(self.model_chunks, hf_weights, hf_config)
        if lora is not None:
            from megatron_bridge.lora import PROJECTIONS

            rank, alpha = lora
            self.lora_spec = megatron_bridge.apply_lora(self.model_chunks, PROJECTIONS, rank, alpha)
            # Only the adapters train (bf16 like the base, fp32 masters below).
            self.params = [p for c in self.model_chunks for p in c.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.optimizer = torch.optim.Adam(self.masters, lr=lr, betas=(0.9, 0.99))
        self.qat_handles = []
        if int4 is not None:
            from weightsync_demo.qat import attach_int4_qat

            for chunk in self.model_chunks:
                self.qat_handles += attach_int4_qat(chunk, int4, tp)
        return sum(p.numel() for p in self.params)

    def _response_logprobs(self, tokens_BS: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """log p(token | prefix) of every response token under the current weights: [B, R]."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        (model,) = self.model_chunks  # the demo runs without pipeline parallelism
        inputs = tokens_BS[:, :-1]
        positions = torch.arange(inputs.shape[1]).expand_as(inputs)
        logits_BSV = model(inputs, positions, None)  # vocab-parallel: [B, S-1, V/tp]
        # The cross entropy all-reduces max and sum-exp over TP: the full softmax, no gather.
        nll = vocab_parallel_cross_entropy(logits_BSV.float(), tokens_BS[:, 1:])
        return -nll[:, prompt_len - 1 :]

    def logprobs(self, tokens_BS: torch.Tensor, prompt_len: int) -> torch.Tensor:
        self.model_chunks[0].eval()
        with torch.no_grad():
            return self._response_logprobs(tokens_BS, prompt_len)

    def train_step(
        self,
        tokens_BS: torch.Tensor,
        prompt_len: int,
        advantages: torch.Tensor,
        rollout_logprobs_BR: torch.Tensor | None = None,
        tis_cap: float = 2.0,
    ) -> dict[str, float]:
        """One GRPO step: REINFORCE with group-normalized advantages, averaged over tokens,
        each token weighted by its truncated importance ratio (``tis_weights``) against the
        engine's ``rollout_logprobs_BR`` [B, R]: ~1 on-policy, the off-policy correction when
        the rollouts came from an older version (async loop). None: on-policy, weight 1.
        ``advantages``: one per response token [B, R], or one per sequence [B] (given to each
        of its tokens)."""
        from weightsync_demo.offpolicy import tis_weights

        B, R = tokens_BS.shape[0], tokens_BS.shape[1] - prompt_len
        if tuple(advantages.shape) == (B,):
            advantages = advantages[:, None].expand(B, R)
        if tuple(advantages.shape) != (B, R):
            raise ValueError(
                f"advantages shape {tuple(advantages.shape)}: expected one per sequence, "
                f"({B},), or one per response token, ({B}, {R})"
            )
        model = self.model_chunks[0]
        model.train()
        for p in self.params:
            p.grad = None
        logp_BR = self._response_logprobs(tokens_BS, prompt_len)
        # The ratio's numerator is this forward: the weights just before the step.
        rollout = logp_BR.detach() if rollout_logprobs_BR is None else rollout_logprobs_BR
        w_BR = tis_weights(logp_BR, rollout, tis_cap)
        loss = -(w_BR * advantages * logp_BR).mean()
        loss.backward()
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.masters, strict=True):
                p.copy_(m)
        return {
            "loss": float(loss.detach()),
            "sample_nll": float(-logp_BR.detach().mean()),
            "tis_mean": float(w_BR.mean()),
            "tis_capped": float((w_BR >= tis_cap).float().mean()),
        }

    def release(self) -> None:
        for h in getattr(self, "qat_handles", []):
            h.remove()


def as_hf_dict(hf_config: Any) -> dict:
    """A picklable config for the actors (megatron_bridge accepts the dict)."""
    d = hf_config.to_dict()
    d["model_type"] = hf_config.model_type
    return d
