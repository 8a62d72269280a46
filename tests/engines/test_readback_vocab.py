"""verify's read-back of a vocabulary that vLLM pads past the real one: with 32 tokens padded
to 64 over TP=2, rank 1 holds only padding. Its (empty) part must still be reported: the
alias fallback would otherwise read its padding rows as the whole (tied) weight, and the
assembled fingerprint would never equal the trainer's (``weightsync demo --engine-tp 2``).
vLLM's own shard indices and the plugin's own read-back; no engine process."""

from __future__ import annotations

import pytest
import torch

V, D, TP = 32, 128, 2


def _rank_model(rank: int, full: torch.Tensor) -> torch.nn.Module:
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    class Embedding(VocabParallelEmbedding):  # the layer's state, without its process group
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            self.org_vocab_size, self.embedding_dim = V, D
            self.shard_indices = VocabParallelEmbedding._get_indices(64, 64, V, V, rank, TP)
            idx = self.shard_indices
            w = torch.zeros(64 // TP, D, dtype=torch.bfloat16)
            w[: idx.num_org_elements] = full[idx.org_vocab_start_index : idx.org_vocab_end_index]
            self.weight = torch.nn.Parameter(w, requires_grad=False)

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.embed_tokens = Embedding()
    model.lm_head = model.model.embed_tokens  # tied, as vLLM's Qwen2 does
    return model


@pytest.mark.parametrize("level", ["sample", "full"])
def test_a_rank_holding_only_vocabulary_padding_reports_an_empty_part(level) -> None:
    pytest.importorskip("vllm")
    from weightsync.engines.vllm_plugin.readback import live_parts
    from weightsync.proof import Probe, assemble, checkpoint_fingerprints

    full = torch.randn(V, D, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    probe = Probe(seed=1234, level=level)
    wanted = {"model.embed_tokens.weight", "lm_head.weight"}
    answers = [live_parts(_rank_model(r, full), probe, wanted) for r in range(TP)]
    assert answers[1] and all(k.startswith("r") for ks in answers[1].values() for k in ks)
    assert assemble(answers) == checkpoint_fingerprints(dict.fromkeys(wanted, full), probe)
