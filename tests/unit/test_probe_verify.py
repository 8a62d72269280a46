"""verify's pure pieces: probe columns and digests, int4 columns, the model-config check, the
post-reload repair's bookkeeping, AMX permission in every engine process."""

from __future__ import annotations

import pytest
import torch

from tests.models import tiny_dims
from weightsync.model_config import mismatches, summary
from weightsync.probe import (
    assemble,
    cols_piece,
    int4_columns,
    logical_name,
    probe_columns,
    probe_digest,
    probe_view,
    rows_piece,
)
from weightsync.quant import pack_int4, unpack_int4


def test_probe_columns_are_fixed_by_the_seed_and_differ_between_seeds():
    a, b = probe_columns(7, 4096), probe_columns(8, 4096)
    assert torch.equal(a, probe_columns(7, 4096)) and not torch.equal(a, b)
    assert len(a) == 8 and a.unique().numel() == 8 and int(a.max()) < 4096
    assert torch.equal(probe_columns(3, 5), torch.arange(5))


def test_probe_digest_sees_one_changed_probed_column_and_the_dtype():
    w = torch.randn(64, 256).to(torch.bfloat16)
    col = int(probe_columns(5, 256)[3])
    changed = w.clone()
    changed[17, col] += 1
    assert probe_digest(changed, 5) != probe_digest(w, 5)
    assert probe_digest(w.float(), 5) != probe_digest(w, 5)
    assert probe_digest(torch.ones(3), 0) == probe_digest(torch.ones(3), 99)  # vectors: whole


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
def test_int4_columns_equal_the_full_dequantization(symmetric, group_size):
    w = torch.randn(48, 128).to(torch.bfloat16)
    parts = pack_int4(w, group_size, symmetric)
    cols = probe_columns(11, 128)
    full = unpack_int4(parts, group_size, symmetric)
    got = int4_columns(parts, cols, group_size, symmetric)
    assert got.dtype == full.dtype and torch.equal(got, full[:, cols])


def _row_shards(w: torch.Tensor, seed: int, ranks: int) -> list[dict]:
    """Each rank's piece of a column-parallel weight: its output rows, probed."""
    n = w.shape[0] // ranks
    return [
        rows_piece(probe_view(w[r * n : (r + 1) * n], seed), r * n, w.shape[0])
        for r in range(ranks)
    ]


def _col_shards(w: torch.Tensor, seed: int, ranks: int) -> list[dict]:
    """Each rank's piece of a row-parallel weight: the probed input columns it holds."""
    total, n = w.shape[-1], w.shape[-1] // ranks
    out = []
    for r in range(ranks):
        cols = [c for c in probe_columns(seed, total).tolist() if r * n <= c < (r + 1) * n]
        out.append(cols_piece(w[:, cols], cols, total, seed) if cols else None)
    return out


def test_shards_assemble_to_the_whole_weights_digest():
    seed = 3
    qkv, down, norm = torch.randn(96, 64), torch.randn(64, 160), torch.randn(64)
    qkv, down = qkv.to(torch.bfloat16), down.to(torch.bfloat16)
    rows, cols = _row_shards(qkv, seed, 2), _col_shards(down, seed, 2)
    answers = [{"qkv": rows[r], "norm": rows_piece(norm, 0, 64)} for r in range(2)]
    for r in range(2):
        if cols[r] is not None:
            answers[r]["down"] = cols[r]
    got = assemble(answers, seed)
    assert got == {
        "qkv": probe_digest(qkv, seed),
        "down": probe_digest(down, seed),
        "norm": probe_digest(norm, seed),
    }
    # TP=1: a rank holding the whole weight sends only its digest.
    assert set(rows_piece(probe_view(qkv, seed), 0, 96)) == {"digest"}
    assert set(
        cols_piece(probe_view(down, seed), probe_columns(seed, 160).tolist(), 160, seed)
    ) == {"digest"}


def test_replicated_kv_shards_must_agree_and_every_row_must_be_held():
    seed, k = 1, torch.randn(16, 64).to(torch.bfloat16)
    same = rows_piece(probe_view(k[:8], seed), 0, 16)
    other = rows_piece(probe_view(k[8:], seed), 8, 16)
    assert assemble([{"k": same}, {"k": same}, {"k": other}, {"k": other}], seed)["k"] == (
        probe_digest(k, seed)
    )
    stale = rows_piece(probe_view(k[:8] + 1, seed), 0, 16)
    assert "disagree" in assemble([{"k": same}, {"k": stale}, {"k": other}], seed)["k"]
    assert "no rank" in assemble([{"k": other}], seed)["k"]
    assert "cover" in assemble([{"k": same}], seed)["k"]


def test_a_stale_shard_or_a_disagreeing_replica_changes_the_digest():
    seed, w = 2, torch.randn(32, 128).to(torch.bfloat16)
    good = _row_shards(w, seed, 2)
    old = w.clone()
    old[16:] += 1  # rank 1 kept old weights
    assert assemble([{"w": good[0]}, {"w": _row_shards(old, seed, 2)[1]}], seed)["w"] != (
        probe_digest(w, seed)
    )
    cols = _col_shards(w, seed, 2)
    assert "no rank" in assemble([{"w": c} for c in cols[:1] if c is not None], seed)["w"]
    n1, n2 = torch.ones(4), torch.zeros(4)
    assert (
        "disagree" in assemble([{"n": rows_piece(n1, 0, 4)}, {"n": rows_piece(n2, 0, 4)}], 0)["n"]
    )


def test_logical_names_fold_int4_parts_into_their_weight():
    assert logical_name("a.q_proj.weight_packed") == "a.q_proj.weight"
    assert logical_name("a.q_proj.weight_scale") is None
    assert logical_name("a.q_proj.weight_shape") is None
    assert logical_name("model.norm.weight") == "model.norm.weight"


def _cfg(**kw):
    return tiny_dims(vocab_size=32) | kw


def test_model_config_summary_fills_defaults_and_names_each_mismatch():
    s = summary(_cfg())
    assert s["head_dim"] == 64 and s["num_experts"] == 0 and s["quantization"] is None
    assert summary(_cfg(num_local_experts=8))["num_experts"] == 8
    assert mismatches(s, summary(_cfg())) == []
    bad = mismatches(s, summary(_cfg(tie_word_embeddings=True, head_dim=32)))
    assert [b.split(":")[0] for b in bad] == ["tie_word_embeddings", "head_dim"]
    from weightsync.quant import Int4Config

    q32 = Int4Config(group_size=32).to_quantization_config()
    q128 = Int4Config(group_size=128).to_quantization_config()
    assert mismatches(summary(_cfg(), q32), summary(_cfg(quantization_config=q32))) == []
    assert mismatches(summary(_cfg(), q32), summary(_cfg(quantization_config=q128)))
    assert mismatches(summary(_cfg()), summary(_cfg(quantization_config=q32)))


class _Method:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def process_weights_after_loading(self, layer):
        self.log.append(self.name)


def test_reload_repair_reprocesses_aliases_of_reloaded_modules_and_reloaded_moe_once():
    from types import SimpleNamespace

    from weightsync.engines.vllm_plugin.repair import ReloadRepair

    log: list[str] = []
    shared = torch.nn.Parameter(torch.zeros(4, 2))
    model = torch.nn.Module()
    model.embed, model.head, model.moe = torch.nn.Module(), torch.nn.Module(), torch.nn.Module()
    model.embed.weight = model.head.weight = shared
    model.embed.quant_method = _Method(log, "embed")
    model.head.quant_method = _Method(log, "head")
    model.moe.quant_method = SimpleNamespace(
        moe_kernel=SimpleNamespace(fused_experts=_Method(log, "moe"))
    )
    repair = ReloadRepair(model)
    assert repair.aliases == [[model.embed, model.head]] and repair.moe == [model.moe]
    repair.apply({model.embed, model.moe})
    assert log == ["head", "moe"]  # the tied head, and the experts' prepack exactly once
    log.clear()
    repair.apply(set())  # nothing reloaded: nothing may be processed twice
    assert log == []


def test_every_vllm_process_asks_for_amx_when_the_plugin_registers(monkeypatch):
    pytest.importorskip("vllm")
    import weightsync.engines.vllm_plugin as plugin

    asked = []
    monkeypatch.setattr(plugin, "request_amx", lambda: asked.append(1) or True)
    plugin.register()
    assert asked == [1]


def test_amx_permission_is_granted_on_amx_cpus():
    import subprocess
    import sys
    from pathlib import Path

    if "amx_tile" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("no AMX on this CPU: nothing to request")
    code = (
        "import ctypes; from weightsync.engines.vllm_plugin import request_amx; "
        "libc = ctypes.CDLL(None); perm = ctypes.c_uint64(); "
        "assert request_amx(); libc.syscall(158, 0x1022, ctypes.byref(perm)); "
        "assert perm.value & (1 << 18), hex(perm.value)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_an_empty_shard_decodes_and_a_rank_holding_the_whole_vocab_suffices():
    from weightsync.probe import decode, encode

    empty = torch.empty(0, 8, dtype=torch.bfloat16)
    assert decode(encode(empty)).shape == (0, 8)
    w = torch.randn(32, 128).to(torch.bfloat16)  # rank 0 holds all rows; rank 1 none (padding)
    assert assemble([{"w": rows_piece(probe_view(w, 4), 0, 32)}, {}], 4) == {
        "w": probe_digest(w, 4)
    }
