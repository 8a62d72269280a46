"""verify's proof (``weightsync.proof``), pure: the parts an engine's TP ranks fingerprint add
up to the trainer's fingerprint of the whole weight; the probed columns cover every shard and
int4 group; and what a fingerprint does and does not see.

The engine side is simulated in torch the way ``vllm_plugin.readback`` reads: a
column-parallel rank holds output rows (key ``r<start>+<n>``, GQA replicas report the same
key), a row-parallel rank holds input columns (key ``c<start>+<n>``) and reads only the probed
ones it holds, both in chunks of columns.

Legend: ``w_OI`` a weight [out, in]; ``cols_C`` global input columns.
"""

from __future__ import annotations

import pytest
import torch

from weightsync.probe import int4_columns
from weightsync.proof import (
    _B_HIGH,
    _KEYS,
    P,
    Probe,
    _keys,
    assemble,
    combine,
    fingerprint,
    fingerprint_columns,
    partial,
    partials,
    strata_of,
)
from weightsync.quant import Int4Config, quantize_named, unpack_int4

NAME = "model.layers.0.mlp.down_proj.weight"
CHUNK = 256  # columns per kernel read, as the engine reads at level full
Answers = list[dict[str, dict[str, dict]]]


def _held(probe: Probe, name: str, total: int, start: int, n: int) -> torch.Tensor:
    """The probed global columns of ``name`` in ``[start, start + n)`` (readback's ``_cols``)."""
    cols = probe.columns(name, total)
    if cols is None:
        return torch.arange(start, start + n)
    return cols[(cols >= start) & (cols < start + n)]


def _add(answer: dict, name: str, key: str, part: dict) -> None:
    keyed = answer.setdefault(name, {})
    keyed[key] = combine([keyed[key], part]) if key in keyed else part


def rows_ranks(w_OI: torch.Tensor, probe: Probe, name: str, tp: int, replicas: int = 1) -> Answers:
    """A column-parallel layer on ``tp`` ranks: each holds output rows, ``replicas`` ranks
    hold the same rows (KV heads fewer than ranks)."""
    out, in_features = w_OI.shape
    n = out * replicas // tp
    answers: Answers = []
    for rank in range(tp):
        start, answer = (rank // replicas) * n, {}
        cols = _held(probe, name, in_features, 0, in_features)
        for s in range(0, len(cols), CHUNK):
            chunk = cols[s : s + CHUNK]
            part = partial(
                w_OI[start : start + n, chunk], probe, name, (start, out), chunk, in_features
            )
            _add(answer, name, f"r{start}+{n}", part)
        answers.append(answer)
    return answers


def cols_ranks(w_OI: torch.Tensor, probe: Probe, name: str, tp: int) -> Answers:
    """A row-parallel layer on ``tp`` ranks: each holds input columns, reads the probed ones."""
    out, in_features = w_OI.shape
    per = in_features // tp
    answers: Answers = []
    for rank in range(tp):
        start, answer = rank * per, {}
        cols = _held(probe, name, in_features, start, per)
        for s in range(0, len(cols), CHUNK):
            chunk = cols[s : s + CHUNK]
            part = partial(w_OI[:, chunk], probe, name, (0, out), chunk, in_features)
            _add(answer, name, f"c{start}+{per}", part)
        answers.append(answer)
    return answers


def _weight(out: int = 64, in_features: int = 512, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, in_features, generator=g) * 0.02).to(dtype)


# --- shards assemble to the trainer's fingerprint ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("level", ["sample", "full"])
@pytest.mark.parametrize(
    "layout, tp, replicas",
    [
        *[("rows", 1, 1), ("rows", 2, 1), ("rows", 4, 1), ("rows", 4, 2), ("rows", 2, 2)],
        *[("cols", 1, 1), ("cols", 2, 1), ("cols", 4, 1)],
    ],
)
def test_engine_shards_assemble_to_the_trainers_fingerprint(dtype, level, layout, tp, replicas):
    w, probe = _weight(dtype=dtype), Probe(seed=12345, level=level)
    if layout == "rows":
        answers = rows_ranks(w, probe, NAME, tp, replicas)
    else:
        answers = cols_ranks(w, probe, NAME, tp)
    assert assemble(answers) == {NAME: fingerprint(w, probe, NAME)}


def test_several_weights_and_a_vector_assemble_by_name():
    probe = Probe(seed=7)
    qkv, down, norm = _weight(96, 64), _weight(64, 160, seed=1), torch.randn(64).bfloat16()
    norm_part = partial(norm, probe, "norm", (0, 1), torch.arange(64), 64)
    rows, cols = rows_ranks(qkv, probe, "qkv", 2), cols_ranks(down, probe, "down", 2)
    answers = [rows[r] | cols[r] | {"norm": {"all": norm_part}} for r in range(2)]
    assert assemble(answers) == {
        "qkv": fingerprint(qkv, probe, "qkv"),
        "down": fingerprint(down, probe, "down"),
        "norm": fingerprint(norm, probe, "norm"),
    }


@pytest.mark.parametrize("level", ["sample", "full"])
@pytest.mark.parametrize("group", [32, 128])
def test_an_int4_weight_is_proven_on_its_dequantized_values(level, group):
    w = _weight(64, 1024)
    parts = dict(quantize_named(NAME, w, Int4Config(group_size=group)))
    parts = {n.rpartition(".")[2]: t for n, t in parts.items()}
    probe = Probe(seed=99, level=level, group=group)
    cols = probe.columns(NAME, 1024)
    cols = torch.arange(1024) if cols is None else cols
    # The trainer: the probed columns dequantized from the bytes it sent.
    sent = fingerprint_columns(int4_columns(parts, cols, group, True), cols, 1024, probe, NAME)
    # The engine (TP=2 row-parallel): its kernel's dequantized weight, read per shard.
    served = unpack_int4(parts, group, True)
    assert assemble(cols_ranks(served, probe, NAME, 2)) == {NAME: sent}


# --- the probed columns ---------------------------------------------------------------


@pytest.mark.parametrize("in_features", [16, 24, 40, 96, 512, 1000, 4096, 11008, 18944])
def test_every_tp_shard_holds_a_probed_column(in_features):
    for seed in range(5):
        cols = Probe(seed=seed).columns(NAME, in_features)
        assert torch.equal(cols, cols.unique())  # ascending, distinct
        assert len(cols) == strata_of(in_features, 0) >= min(16, in_features)
        for tp in (t for t in (1, 2, 4, 8, 16) if in_features % t == 0):
            per = in_features // tp
            held = torch.bincount(cols // per, minlength=tp)
            assert len(held) == tp and bool((held >= 1).all()), (in_features, tp, held)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("groups", [1, 3, 5, 8, 20, 32, 148])
def test_every_int4_group_and_group_aligned_shard_holds_a_probed_column(group, groups):
    in_features = group * groups
    for seed in range(5):
        cols = Probe(seed=seed, group=group).columns(NAME, in_features)
        assert bool((torch.bincount(cols // group, minlength=groups) >= 1).all())
        # An int4 engine's shard holds whole groups.
        for tp in (t for t in (1, 2, 4, 8, 16) if groups % t == 0):
            held = torch.bincount(cols // (in_features // tp), minlength=tp)
            assert bool((held >= 1).all()), (in_features, group, tp)


def test_columns_change_per_name_and_update_and_both_sides_agree():
    probe = Probe(seed=5, group=0)
    a = probe.columns(NAME, 4096)
    assert torch.equal(a, Probe(seed=5).columns(NAME, 4096))
    assert not torch.equal(a, probe.columns("model.layers.0.mlp.up_proj.weight", 4096))
    assert not torch.equal(a, Probe(seed=6).columns(NAME, 4096))
    # The engine learns the probe from its query text and picks the same columns.
    engine = Probe.parse(probe.query()[len("proof:") :])
    assert engine == probe and torch.equal(engine.columns(NAME, 4096), a)
    assert Probe(seed=5, level="full").columns(NAME, 4096) is None


# --- what a fingerprint sees -----------------------------------------------------------


def test_replicas_that_disagree_give_a_mismatch():
    w, probe = _weight(), Probe(seed=3)
    answers = rows_ranks(w, probe, NAME, 4, replicas=2)
    stale = w.clone()
    stale[:32, :] += 1
    answers[1] = rows_ranks(stale, probe, NAME, 4, replicas=2)[1]  # rank 1 replicates rank 0
    assert assemble(answers)[NAME].startswith("mismatch")


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_a_missing_rank_changes_the_fingerprint(layout):
    w, probe = _weight(), Probe(seed=4)
    answers = rows_ranks(w, probe, NAME, 2) if layout == "rows" else cols_ranks(w, probe, NAME, 2)
    assert assemble(answers[:1])[NAME] != fingerprint(w, probe, NAME)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_changed_element_counts_in_a_probed_column_at_sample_and_anywhere_at_full(dtype):
    w, sample, full = _weight(dtype=dtype), Probe(seed=8), Probe(seed=8, level="full")
    cols = sample.columns(NAME, w.shape[1])
    unprobed = next(c for c in range(w.shape[1]) if c not in cols.tolist())
    for col, seen_at_sample in ((int(cols[3]), True), (unprobed, False)):
        changed = w.clone()
        changed[17, col] *= -2
        assert (fingerprint(changed, sample, NAME) != fingerprint(w, sample, NAME)) is (
            seen_at_sample
        )
        assert fingerprint(changed, full, NAME) != fingerprint(w, full, NAME)


def test_a_one_bit_flip_counts_a_sign_of_zero_does_not():
    w, probe = _weight(), Probe(seed=9)
    col = int(probe.columns(NAME, w.shape[1])[0])
    flipped = w.clone()
    flipped.view(torch.int16)[5, col] ^= 1
    assert fingerprint(flipped, probe, NAME) != fingerprint(w, probe, NAME)
    # A one-hot GEMM reads a stored -0.0 back as +0.0: both count as +0.0 (they compute
    # alike), else a weight holding -0.0 would never verify.
    zero, negative = w.clone(), w.clone()
    zero[5, col], negative[5, col] = 0.0, -0.0
    assert fingerprint(zero, probe, NAME) == fingerprint(negative, probe, NAME)


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_an_omitted_column_of_zeros_changes_the_hashes(zero):
    w, probe = _weight(), Probe(seed=10, level="full")
    w[:, 100] = zero
    rows, cols = (0, w.shape[0]), torch.arange(w.shape[1])
    whole = partial(w, probe, NAME, rows, cols, w.shape[1])
    kept = cols != 100
    without = partial(w[:, kept], probe, NAME, rows, cols[kept], w.shape[1])
    assert whole["h"] != without["h"]  # not only the element count: no word hashes as 0


def test_a_weight_with_other_values_or_dtype_does_not_match():
    w, probe = _weight(), Probe(seed=11)
    assert fingerprint(w, probe, NAME) != fingerprint(w.float(), probe, NAME)
    assert fingerprint(w, probe, NAME) != fingerprint(w, probe, "model.other.weight")
    assert fingerprint(w, probe, NAME) != fingerprint(w, Probe(seed=12), NAME)


# --- the probe as text ------------------------------------------------------------------


@pytest.mark.parametrize(
    "probe",
    [Probe(seed=0), Probe(seed=(1 << 62) - 1, level="full", group=128), Probe(seed=7, group=32)],
)
def test_a_probe_round_trips_through_its_query(probe):
    assert probe.query().startswith("proof:")
    assert Probe.parse(probe.query()[len("proof:") :]) == probe


@pytest.mark.parametrize(
    "bad",
    [
        *["", "sample", "sample:0", "sample::1", "sample:x:1", "sample:0:-1", "sample:0:1.5"],
        *["off:0:1", "bogus:0:1", "sample:0:" + "9" * 20, "sample:0:" + str(1 << 62)],
    ],
)
def test_a_bad_query_is_refused(bad):
    with pytest.raises(ValueError):
        Probe.parse(bad)


@pytest.mark.parametrize("level", ["off", "SAMPLE", "all"])
def test_a_level_other_than_sample_or_full_is_refused(level):
    with pytest.raises(ValueError, match="sample"):
        Probe(seed=1, level=level)


def test_seed_and_group_out_of_range_are_refused():
    for kw in ({"seed": -1}, {"seed": 1 << 62}, {"seed": 1, "group": -1}):
        with pytest.raises(ValueError):
            Probe(**kw)


# --- exactness --------------------------------------------------------------------------


def _exact(w_RC: torch.Tensor, probe: Probe, name: str) -> list[int]:
    """The fingerprint by the formula, in integers (no float64 chunks): every column; a
    bf16 -0.0 (word 0x8000) counted as +0.0, as a GEMM returns it."""
    words = w_RC.contiguous().view(torch.int16)
    words = words.masked_fill(words == -(1 << 15), 0)
    v_RW = words.to(torch.int64) + 32769  # in [1, 2^16]
    b_WK = _keys(probe.seed, "cols", v_RW.shape[1], _B_HIGH)
    a_RK = _keys(probe.seed, "rows", v_RW.shape[0], P)
    sums_RK = (v_RW @ b_WK) % P  # < 2^16 * 2^21 * 2^17 words: exact in int64
    assert sums_RK.shape[1] == _KEYS
    return ((sums_RK * a_RK) % P).sum(0).remainder(P).tolist()


@pytest.mark.parametrize("words", ["random", "largest"])
def test_rows_wider_than_one_float64_chunk_stay_exact(words):
    # Several chunks: one float64 sum over the whole row would round (about 2^54).
    in_features = 3 * (1 << 16) + 4000
    g = torch.Generator().manual_seed(0)
    # Any 16-bit pattern (NaNs included: the words are hashed, not the values); the largest
    # words make the float64 row sums as large as they can be.
    v = torch.randint(-(1 << 15), 1 << 15, (3, in_features), generator=g, dtype=torch.int16)
    if words == "largest":
        v = v.remainder(1024).add((1 << 15) - 1024).to(torch.int16)
    w = v.view(torch.bfloat16)
    probe = Probe(seed=21, level="full")
    whole = partial(w, probe, NAME, (0, 3), torch.arange(in_features), in_features)
    assert whole["h"] == _exact(w, probe, NAME)
    cut = 100_000
    halves = [
        partial(w[:, :cut], probe, NAME, (0, 3), torch.arange(cut), in_features),
        partial(w[:, cut:], probe, NAME, (0, 3), torch.arange(cut, in_features), in_features),
    ]
    assert combine(halves) == whole
    assert assemble([{NAME: {"c0+1": halves[0]}}, {NAME: {"c1+1": halves[1]}}]) == {
        NAME: fingerprint(w, probe, NAME)
    }


MLA = dict(heads=4, nope=8, v_dim=6, lora=64, tp=2)
KV_B = "model.layers.0.self_attn.kv_b_proj.weight"


def _mla_rank_parts(kv_b: torch.Tensor, rank: int, probe: Probe, stale: bool = False) -> dict:
    """What ``readback._mla_decode`` reports on TP rank ``rank``, its decode copies cut the
    way vLLM derives them (``split_kv_b_proj``: [L, heads, nope + v] -> W_UK_T [heads, nope,
    L], W_UV [heads, L, v]); ``stale``: one head's W_UV not derived again."""
    from types import SimpleNamespace

    from weightsync.engines.vllm_plugin.readback import _mla_decode

    heads, nope, v_dim, lora, tp = (MLA[k] for k in ("heads", "nope", "v_dim", "lora", "tp"))
    mine = slice(rank * heads // tp, (rank + 1) * heads // tp)
    w_LNX = kv_b.view(heads, nope + v_dim, lora)[mine].permute(2, 0, 1)
    w_uk, w_uv = w_LNX.split([nope, v_dim], dim=-1)
    w_uv = w_uv.transpose(0, 1).contiguous()
    if stale:
        w_uv[0] += 1
    mla = SimpleNamespace(
        num_heads=heads // tp,
        qk_nope_head_dim=nope,
        v_head_dim=v_dim,
        kv_b_proj=SimpleNamespace(tp_rank=rank, tp_size=tp),
        W_UK_T=w_uk.permute(1, 2, 0).contiguous(),
        W_UV=w_uv,
    )
    parts: dict = {}
    for name, key, piece in _mla_decode(mla, probe, KV_B.removesuffix(".weight")):
        assert name == f"{KV_B}#decode"
        part = partials([piece], probe)[0]
        parts[key] = combine([parts[key], part]) if key in parts else part
    return {name: parts}


@pytest.mark.parametrize("level", ["sample", "full"])
def test_mla_decode_copies_fingerprint_as_the_kv_b_proj_rows_they_were_cut_from(level):
    """The decode copies of a TP=2 engine add up over the ranks to the fingerprint of the
    whole kv_b_proj; a rank with one stale head does not."""
    probe = Probe(seed=5, level=level)
    kv_b = torch.randn(MLA["heads"] * (MLA["nope"] + MLA["v_dim"]), MLA["lora"])
    kv_b = kv_b.to(torch.bfloat16)
    want = fingerprint(kv_b, probe, KV_B)
    live = assemble([_mla_rank_parts(kv_b, 0, probe), _mla_rank_parts(kv_b, 1, probe)])
    assert live == {f"{KV_B}#decode": want}
    stale = assemble([_mla_rank_parts(kv_b, 0, probe), _mla_rank_parts(kv_b, 1, probe, True)])
    assert stale[f"{KV_B}#decode"] != want
