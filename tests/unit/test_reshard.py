"""Reshard plan from configs alone: vLLM's slicing of HF tensors (engine_shards), which trainer
ranks hold which slice (megatron_bridge.holdings), and the moves between them (reshard), int4
wire bytes and refusals included. Pure: no processes, no tensors."""

from __future__ import annotations

import itertools
import math
import re
from functools import cache

import pytest

from megatron_bridge.holdings import ParallelSizes, plan_holdings
from megatron_bridge.meta import Holding, box_numel
from megatron_bridge.model import padded_vocab_size
from tests.bridge_helpers import checkpoint_keys, hf_config
from weightsync.engine_shards import EngineLayout, ModelShape, engine_box
from weightsync.quant import Int4Config
from weightsync.reshard import plan_reshard

MODEL = ModelShape(vocab=97, heads=4, kv_heads=2, experts=4)  # tests.bridge_helpers' tiny models
L0 = "model.layers.0"


def _whole(shape):
    return tuple((0, s) for s in shape)


def _inside(inner, outer):
    return all(a <= lo < hi <= b for (lo, hi), (a, b) in zip(inner, outer, strict=True))


def _assert_tiles(boxes, target, what):
    """``boxes`` are disjoint, lie inside ``target`` and together are all of it."""
    assert all(_inside(b, target) for b in boxes), (what, boxes, target)
    for a, b in itertools.combinations(boxes, 2):
        overlap = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b, strict=True))
        assert box_numel(overlap) == 0, (what, a, b)
    assert sum(box_numel(b) for b in boxes) == box_numel(target), (what, boxes, target)


def _box(name, shape, rank, tp=2, ep=False, model=MODEL, pad=64):
    return engine_box(name, shape, EngineLayout(tp, ep, pad), model, rank)


# --- engine_box ---------------------------------------------------------------------------


def test_engine_column_blocks_rows_and_row_parallel_blocks_columns():
    for n in ("self_attn.q_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"):
        assert _box(f"{L0}.{n}", (48, 32), 1) == ((24, 48), (0, 32))
    assert _box(f"{L0}.self_attn.q_proj.bias", (48,), 0) == ((0, 24),)
    assert _box(f"{L0}.self_attn.kv_b_proj.weight", (80, 16), 1, tp=4) == ((20, 40), (0, 16))
    for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert _box(f"{L0}.{n}", (32, 48), 1) == ((0, 32), (24, 48))
    with pytest.raises(ValueError, match="unknown"):  # refused at tp 1 too
        _box("model.anything.unknown", (5, 7), 0, tp=1)


def test_engine_vocab_rows_of_the_padded_vocabulary_clipped():
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        # 97 -> 128 padded, 2 blocks of 64: the second clipped to the real 97 rows
        assert [_box(name, (97, 32), r) for r in range(2)] == [
            ((0, 64), (0, 32)),
            ((64, 97), (0, 32)),
        ]
    m = ModelShape(vocab=65, heads=4, kv_heads=2)  # 65 -> 128, blocks of 32: rank 3 starts past 65
    got = [_box("lm_head.weight", (65, 8), r, tp=4, model=m) for r in range(4)]
    assert got == [((0, 32), (0, 8)), ((32, 64), (0, 8)), ((64, 65), (0, 8)), None]
    # vocab_pad 256: 97 -> 256, blocks of 64 over tp 4: ranks 2, 3 hold only padding
    got = [_box("model.embed_tokens.weight", (97, 8), r, tp=4, pad=256) for r in range(4)]
    assert got == [((0, 64), (0, 8)), ((64, 97), (0, 8)), None, None]


def test_engine_kv_heads_split_or_replicated():
    k, v_bias = f"{L0}.self_attn.k_proj.weight", f"{L0}.self_attn.v_proj.bias"
    # 2 KV heads of 12 rows: tp 2 cuts by head, tp 4/8 gives head rank // (tp / 2)
    assert [_box(k, (24, 32), r) for r in range(2)] == [((0, 12), (0, 32)), ((12, 24), (0, 32))]
    for tp in (4, 8):
        for r in range(tp):
            head = r // (tp // 2)
            assert _box(k, (24, 32), r, tp=tp) == ((12 * head, 12 * head + 12), (0, 32))
            assert _box(v_bias, (24,), r, tp=tp) == ((12 * head, 12 * head + 12),)
    with pytest.raises(ValueError, match=r"k_proj\.weight"):  # 3 ranks cannot share 2 heads
        _box(k, (24, 32), 0, tp=3)


def test_engine_experts_whole_under_expert_parallel_cut_without():
    gate, down = f"{L0}.mlp.experts.3.gate_proj.weight", f"{L0}.mlp.experts.1.down_proj.weight"
    # 4 experts over 2 ranks: experts 0-1 on rank 0, 2-3 on rank 1
    assert [_box(gate, (16, 32), r, ep=True) for r in range(2)] == [None, ((0, 16), (0, 32))]
    assert [_box(down, (32, 16), r, ep=True) for r in range(2)] == [((0, 32), (0, 16)), None]
    assert _box(gate, (16, 32), 1) == ((8, 16), (0, 32))
    assert _box(down, (32, 16), 1) == ((0, 32), (8, 16))
    shared = f"{L0}.mlp.shared_expert.up_proj.weight"  # a dense MLP even under EP
    assert _box(shared, (24, 32), 1, ep=True) == ((12, 24), (0, 32))
    with pytest.raises(ValueError, match=r"experts\.3\.gate_proj"):
        _box(gate, (16, 32), 0, tp=3, ep=True)


def test_engine_norms_routers_and_mla_down_projections_whole():
    names = [
        "model.norm.weight",
        f"{L0}.input_layernorm.weight",
        f"{L0}.self_attn.q_norm.weight",
        f"{L0}.mlp.gate.weight",
        f"{L0}.mlp.gate.e_score_correction_bias",
        f"{L0}.mlp.shared_expert_gate.weight",
        f"{L0}.self_attn.q_a_proj.weight",
        f"{L0}.self_attn.kv_a_proj_with_mqa.weight",
    ]
    for name in names:
        for r in range(4):
            assert _box(name, (6, 5), r, tp=4, ep=True) == ((0, 6), (0, 5)), name


def test_engine_refuses_unknown_names_and_indivisible_dims():
    with pytest.raises(ValueError, match=r"self_attn\.rotary\.inv_freq"):
        _box(f"{L0}.self_attn.rotary.inv_freq", (8,), 0)
    with pytest.raises(ValueError, match=r"mlp\.down_proj\.weight"):
        _box(f"{L0}.mlp.down_proj.weight", (32, 48), 0, tp=5)
    with pytest.raises(ValueError, match=r"q_proj\.weight"):
        _box(f"{L0}.self_attn.q_proj.weight", (30, 32), 0, tp=4)


def test_engine_refuses_kv_heads_not_divisible_by_tp():
    # vLLM refuses 3 KV heads over tp 2; engine_box returns rows [0, 6) of 3 heads x 4 rows
    with pytest.raises(ValueError, match="k_proj"):
        _box(
            f"{L0}.self_attn.k_proj.weight",
            (12, 8),
            0,
            model=ModelShape(vocab=97, heads=6, kv_heads=3),
        )


def test_engine_vocab_blocks_cover_the_vocabulary_or_refuse():
    m = ModelShape(vocab=128, heads=4, kv_heads=2)
    try:
        boxes = [_box("lm_head.weight", (128, 8), r, tp=3, model=m) for r in range(3)]
    except ValueError:
        return  # refusing (as vLLM's divide() does) is fine
    _assert_tiles([b for b in boxes if b], ((0, 128), (0, 8)), "lm_head")  # rows 126, 127 lost


# --- trainer ranks and holdings -------------------------------------------------------------


def test_megatron_rank_order_tp_cp_ep_dp_pp():
    s = ParallelSizes(8, tp=2, pp=2)  # dp 2: rank = tp_r + 2 * (dp_r + 2 * pp_r)
    assert s.dense_ranks(1, 1) == (1 + 2 * 2, 1 + 2 * 3) == (5, 7)
    assert s.dense_ranks(0, 0) == (0, 2)
    s = ParallelSizes(8, pp=2, ep=2, etp=1)  # edp 2: rank = ep_r + 2 * (edp_r + 2 * pp_r)
    assert s.expert_ranks(0, 1, 0) == (1, 3)
    assert s.expert_ranks(0, 1, 1) == (5, 7)
    s = ParallelSizes(8, tp=2, ep=2, etp=2)  # edp 2: rank = etp_r + 2 * (ep_r + 2 * edp_r)
    assert s.expert_ranks(1, 1, 0) == (3, 7)
    for s in (ParallelSizes(8, tp=2, pp=2, ep=2), ParallelSizes(16, tp=4, pp=2, ep=4, etp=2)):
        dense = [s.dense_ranks(t, p) for t in range(s.tp) for p in range(s.pp)]
        experts = [
            s.expert_ranks(t, e, p) for t in range(s.etp) for e in range(s.ep) for p in range(s.pp)
        ]
        for groups in (dense, experts):  # every rank in exactly one group
            assert sorted(itertools.chain(*groups)) == list(range(s.world))


@pytest.mark.parametrize("kw", [dict(tp=4), dict(tp=2, pp=2, ep=4), dict(ep=4, etp=2)])
def test_world_not_divisible_is_refused(kw):
    with pytest.raises(ValueError, match="not divisible"):
        ParallelSizes(6, **kw)


@cache
def _trainer(family, tp, pp, ep=1, etp=1, world=4):
    cfg = hf_config(family, num_hidden_layers=2)
    sizes = ParallelSizes(world, tp, pp, ep, etp, padded_vocab_size(97, 128, tp))
    return plan_holdings(cfg, sizes), checkpoint_keys(cfg)


LAYOUTS = [
    ("llama", 1, 1, 1, 1),
    ("llama", 2, 1, 1, 1),
    ("llama", 2, 2, 1, 1),
    ("qwen3", 2, 2, 1, 1),  # tied: no lm_head
    ("qwen2_moe", 2, 1, 2, 1),
    ("qwen2_moe", 2, 1, 1, 2),
    ("qwen2_moe", 1, 2, 2, 1),
    ("deepseek_v3", 2, 1, 1, 2),
    ("deepseek_v3", 2, 2, 2, 1),
]


@pytest.mark.parametrize("family,tp,pp,ep,etp", LAYOUTS, ids=str)
def test_holdings_tile_every_checkpoint_tensor(family, tp, pp, ep, etp):
    holdings, keys = _trainer(family, tp, pp, ep, etp)
    assert {h.name: h.shape for h in holdings} == keys  # transformers' own names and shapes
    per_stage = 4 // pp
    for name, shape in keys.items():
        held = [h for h in holdings if h.name == name]
        _assert_tiles([h.box for h in held], _whole(shape), name)
        for h in held:
            assert len({r // per_stage for r in h.ranks}) == 1, h  # one pipeline stage
            assert len(set(h.ranks)) == len(h.ranks) and h.ranks == tuple(sorted(h.ranks))
            if ".experts." not in h.mcore and h.block >= 0:
                assert len(h.ranks) == 4 // (tp * pp), h  # the data-parallel replicas
    stage = {h.name: h.ranks[0] // per_stage for h in holdings}
    assert stage["model.embed_tokens.weight"] == 0
    assert stage["model.norm.weight"] == stage[f"{L0}.input_layernorm.weight"] + pp - 1 == pp - 1


def test_default_padded_vocab_keeps_the_embeddings():
    cfg = hf_config("llama", num_hidden_layers=2)
    names = {h.name for h in plan_holdings(cfg, ParallelSizes(2))}  # default padding
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= names


# --- plan_reshard -----------------------------------------------------------------------------


def _itemsize(keys):
    return {n: 4 if "norm" in n else 2 for n in keys}  # fp32 norms, bf16 otherwise


PLANS = [
    ("llama", (2, 1, 1, 1), [EngineLayout(1)]),
    ("llama", (1, 1, 1, 1), [EngineLayout(2)]),
    ("llama", (2, 2, 1, 1), [EngineLayout(2), EngineLayout(4)]),
    ("qwen3", (2, 1, 1, 1), [EngineLayout(2)]),
    ("qwen2_moe", (2, 1, 2, 1), [EngineLayout(2, expert_parallel=True)]),
    ("qwen2_moe", (2, 1, 1, 2), [EngineLayout(2), EngineLayout(4, expert_parallel=True)]),
    ("deepseek_v3", (2, 2, 2, 1), [EngineLayout(2, expert_parallel=True)]),
]


@pytest.mark.parametrize("family,trainer,engines", PLANS, ids=str)
def test_every_engine_rank_gets_exactly_its_slices_from_their_holders(family, trainer, engines):
    holdings, keys = _trainer(family, *trainer)
    model = ModelShape(vocab=97, heads=4, kv_heads=4 if family == "deepseek_v3" else 2, experts=4)
    itemsize = _itemsize(keys)
    plan = plan_reshard(holdings, itemsize, engines, model)
    assert plan.received == plan.served
    assert sum(plan.sent.values()) == sum(plan.received.values())
    assert plan.model_bytes == sum(math.prod(s) * itemsize[n] for n, s in keys.items())
    for m in plan.moves:
        assert m.nbytes == box_numel(m.box) * itemsize[m.name]
        held = [h for h in holdings if h.name == m.name and m.src in h.ranks]
        assert any(_inside(m.box, h.box) for h in held), m
    for e, layout in enumerate(engines):
        for w in range(layout.tp):
            moves = plan.for_worker(e, w)
            for name, shape in keys.items():
                need = engine_box(name, shape, layout, model, w)
                boxes = [m.box for m in moves if m.name == name]
                if need is None:
                    assert boxes == [], name
                else:
                    _assert_tiles(boxes, need, (e, w, name))


def test_data_parallel_replicas_share_the_sending():
    holdings, keys = _trainer("llama", 2, 1)  # world 4: ranks 0, 2 hold tp block 0; 1, 3 block 1
    plan = plan_reshard(holdings, _itemsize(keys), [EngineLayout(1)], MODEL)
    assert set(plan.sent) == {0, 1, 2, 3}
    biggest = max(m.nbytes for m in plan.moves)  # least-loaded choice keeps each pair within it
    assert abs(plan.sent[0] - plan.sent[2]) <= biggest
    assert abs(plan.sent[1] - plan.sent[3]) <= biggest


def test_a_missing_slice_is_refused_naming_the_tensor():
    holdings, keys = _trainer("llama", 2, 1)
    q = f"{L0}.self_attn.q_proj.weight"
    dropped = [h for h in holdings if not (h.name == q and h.block == 1)]
    assert len(dropped) == len(holdings) - 1
    for engine in (EngineLayout(1), EngineLayout(2)):
        with pytest.raises(ValueError, match=re.escape(q)):
            plan_reshard(dropped, _itemsize(keys), [engine], MODEL)


# --- int4 and row spreading -------------------------------------------------------------------

O_PROJ, NORM, EMBED = (
    f"{L0}.self_attn.o_proj.weight",
    "model.norm.weight",
    "model.embed_tokens.weight",
)


def _hand_holdings(*specs):
    return [Holding(n, s, _whole(s), ranks) for n, s, ranks in specs]


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_wire_bytes_codes_scales_and_zero_points(symmetric):
    held = _hand_holdings((O_PROJ, (32, 96), (0,)), (NORM, (32,), (0,)), (EMBED, (97, 32), (0,)))
    itemsize = {O_PROJ: 2, NORM: 4, EMBED: 2}
    int4 = Int4Config(group_size=16, symmetric=symmetric)
    plan = plan_reshard(held, itemsize, [EngineLayout(2)], MODEL, int4=int4)
    zeros = 0 if symmetric else 32 // 8 * 3 * 4  # 32 rows / 8 per int32, 3 groups
    o = 32 * 48 // 2 + 32 * 3 * 2 + zeros  # each worker: 48 columns = 3 groups of 16
    embed = {0: 64 * 32 * 2, 1: 33 * 32 * 2}  # raw, rows of the 128-padded vocab
    for w in range(2):
        got = {m.name: m.nbytes for m in plan.for_worker(0, w)}
        assert got == {O_PROJ: o, NORM: 32 * 4, EMBED: embed[w]}
    whole_o = 32 * 96 // 2 + 32 * 6 * 2 + (0 if symmetric else 4 * 6 * 4)
    assert plan.model_bytes == whole_o + 32 * 4 + 97 * 32 * 2


Q_PROJ = f"{L0}.self_attn.q_proj.weight"
G32 = Int4Config(group_size=32)
REFUSED = [  # (name, shape, trainer boxes, engine tp, int4)
    (O_PROJ, (32, 96), [_whole((32, 96))], 2, G32),  # engine tp 2 cuts columns at 48
    (O_PROJ, (32, 96), [_whole((32, 96))], 2, Int4Config(group_size=-1)),  # per channel
    (O_PROJ, (32, 96), [((0, 32), (0, 48)), ((0, 32), (48, 96))], 1, G32),  # trainer's cut
    (Q_PROJ, (12, 64), [_whole((12, 64))], 2, Int4Config(group_size=32, symmetric=False)),  # rows 6
]


@pytest.mark.parametrize("name,shape,boxes,tp,int4", REFUSED, ids=str)
def test_int4_refuses_slices_off_group_boundaries(name, shape, boxes, tp, int4):
    held = [Holding(name, shape, b, (r,)) for r, b in enumerate(boxes)]
    with pytest.raises(ValueError, match=re.escape(name)):
        plan_reshard(held, {name: 2}, [EngineLayout(tp)], MODEL, int4=int4)


def test_int4_rows_off_8_are_fine_without_zero_points():
    held = [Holding(Q_PROJ, (12, 64), _whole((12, 64)), (0,))]
    plan = plan_reshard(held, {Q_PROJ: 2}, [EngineLayout(2)], MODEL, int4=G32)
    assert [m.nbytes for m in plan.moves] == [6 * 64 // 2 + 6 * 2 * 2] * 2  # codes + 2 scales


def test_large_replicated_tensor_is_read_from_several_holders():
    held = _hand_holdings((NORM, (64,), (0, 1, 2, 3)))  # 256 bytes on 4 ranks
    plan = plan_reshard(held, {NORM: 4}, [EngineLayout(1)], MODEL, split_bytes=64)
    assert sorted(m.src for m in plan.moves) == [0, 1, 2, 3]
    _assert_tiles([m.box for m in plan.moves], ((0, 64),), NORM)
    assert all(m.nbytes == 64 for m in plan.moves)
    assert len(plan_reshard(held, {NORM: 4}, [EngineLayout(1)], MODEL).moves) == 1  # 1 MiB


def test_int4_row_spread_keeps_multiples_of_8_rows():
    qa = f"{L0}.self_attn.q_a_proj.weight"  # replicated over tp, quantized
    held = _hand_holdings((qa, (24, 32), (0, 1, 2, 3)))
    int4 = Int4Config(group_size=32, symmetric=False)
    plan = plan_reshard(held, {qa: 2}, [EngineLayout(1)], MODEL, int4=int4, split_bytes=16)
    rows = [m.box[0] for m in plan.moves]
    assert len(rows) > 1 and len({m.src for m in plan.moves}) == len(rows)
    assert all(lo % 8 == 0 and hi % 8 == 0 for lo, hi in rows)
    _assert_tiles([m.box for m in plan.moves], ((0, 24), (0, 32)), qa)
    assert sum(m.nbytes for m in plan.moves) == 24 * 32 // 2 + 24 * 2 + 3 * 4  # == whole


def test_kv_heads_fewer_than_trainer_tp_are_refused_naming_the_tensor():
    cfg = hf_config("llama", num_hidden_layers=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"k_proj\.weight: 1 KV heads over tensor parallel 2"):
        plan_holdings(cfg, ParallelSizes(2, tp=2))


def test_sharded_sync_config_is_refused_where_it_cannot_run():
    from weightsync import SyncConfig

    assert SyncConfig(sharded=True).sharded
    for bad in (dict(transport="ipc"), dict(engine_stage_bytes=1 << 20)):
        with pytest.raises(ValueError, match="sharded"):
            SyncConfig(sharded=True, **bad)


def test_rounds_feed_every_engine_rank_at_once_and_keep_each_pairs_order():
    from weightsync.shard_transfer import plan_rounds

    held = plan_holdings(hf_config("llama", num_hidden_layers=2), ParallelSizes(2, tp=2))
    engines = [EngineLayout(2), EngineLayout(2)]
    plan = plan_reshard(held, {h.name: 2 for h in held}, engines, MODEL)
    rounds = plan_rounds(plan.moves, 1 << 14)
    assert sorted(map(repr, (m for r in rounds for m in r))) == sorted(map(repr, plan.moves))
    assert len(rounds) > 1 and len({(m.engine, m.worker) for m in rounds[0]}) == 4
    for r in rounds:  # no endpoint past the bound, unless one move alone
        for end in {m.src for m in r}:
            mine = [m.nbytes for m in r if m.src == end]
            assert sum(mine) <= 1 << 14 or len(mine) == 1
    flat = [m for r in rounds for m in r]
    for pair in {(m.src, m.engine, m.worker) for m in plan.moves}:
        order = [m for m in plan.moves if (m.src, m.engine, m.worker) == pair]
        assert [m for m in flat if (m.src, m.engine, m.worker) == pair] == order
