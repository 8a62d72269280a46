"""Bucket plan: pure layout tests (no processes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightsync.plan import (
    TensorMeta,
    allocate_bucket,
    bucket_views,
    build_plan,
    fill_bucket,
    unpack_bucket,
)

BF16, F32, I32, I64 = torch.bfloat16, torch.float32, torch.int32, torch.int64
PINNED_DIGEST = "92796e96d420164330f84c71c9fa1619da7df7f1a72c5fc52777c27100ef92a1"


def _meta(name, dtype, shape, unit=None):
    return TensorMeta(name, dtype, tuple(shape), unit or name)


def _int4_unit(prefix, out, inp, group=32):
    u = prefix
    return [
        _meta(f"{prefix}.weight_packed", I32, (out, inp // 8), u),
        _meta(f"{prefix}.weight_scale", BF16, (out, inp // group), u),
        _meta(f"{prefix}.weight_shape", I64, (2,), u),
    ]


def _nbytes(m):
    return math.prod(m.shape) * m.dtype.itemsize


def _random_tensor(dtype, shape, gen):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=torch.int64).to(dtype)


def test_buckets_are_byte_bounded_and_in_stream_order():
    metas = [_meta(f"t{i}", BF16, (64,)) for i in range(10)]  # 128 B each
    plan = build_plan(metas, bucket_bytes=300)
    assert [b.names() for b in plan.buckets] == [
        ["t0", "t1"],
        ["t2", "t3"],
        ["t4", "t5"],
        ["t6", "t7"],
        ["t8", "t9"],
    ]
    assert all(b.nbytes <= 300 for b in plan.buckets)
    assert [b.index for b in plan.buckets] == list(range(5))


def test_unit_is_never_split_and_oversized_unit_gets_its_own_bucket():
    metas = [
        _meta("a", BF16, (10,)),
        *[_meta(f"qkv.{p}", BF16, (100,), "layer0.qkv") for p in "qkv"],  # 600 B unit
        _meta("b", BF16, (10,)),
    ]
    plan = build_plan(metas, bucket_bytes=256)
    assert [b.names() for b in plan.buckets] == [["a"], ["qkv.q", "qkv.k", "qkv.v"], ["b"]]
    assert plan.buckets[1].nbytes == 600 > plan.bucket_bytes


def test_groups_per_dtype_in_decreasing_item_size_and_naturally_aligned():
    metas = [_meta("n", BF16, (3,), "u"), *_int4_unit("x", 16, 64), _meta("f", F32, (5,), "u2")]
    (bucket,) = build_plan(metas).buckets
    assert [g.dtype for g in bucket.groups] == [I64, F32, I32, BF16]
    assert bucket.names() == ["x.weight_shape", "f", "x.weight_packed", "n", "x.weight_scale"]
    for g in bucket.groups:
        assert g.byte_offset % g.dtype.itemsize == 0
        assert sum(s.numel for s in g.entries) == g.numel
    ends = [g.byte_offset + g.nbytes for g in bucket.groups]
    assert [g.byte_offset for g in bucket.groups[1:]] == ends[:-1]  # no padding anywhere
    assert bucket.nbytes == ends[-1] == sum(_nbytes(m) for m in metas)


def test_layout_equals_sglang_flattened_bucket():
    tensor_bucket = pytest.importorskip("sglang.srt.weight_sync.tensor_bucket")
    metas = [_meta("n", BF16, (3,), "u"), *_int4_unit("x", 16, 64), _meta("f", F32, (5,), "u2")]
    (bucket,) = build_plan(metas).buckets
    gen = torch.Generator().manual_seed(0)
    tensors = {m.name: _random_tensor(m.dtype, m.shape, gen) for m in metas}
    flat = allocate_bucket(bucket.nbytes)
    fill_bucket(bucket, bucket_views(bucket, flat), tensors.items())
    ref = tensor_bucket.FlattenedTensorBucket(
        named_tensors=[(n, tensors[n]) for n in bucket.names()]
    )
    assert torch.equal(ref.get_flattened_tensor(), flat)
    empty = tensor_bucket.FlattenedTensorBucket.empty(
        [n for n, _, _ in bucket.metas()],
        [d for _, d, _ in bucket.metas()],
        [s for _, _, s in bucket.metas()],
        "cpu",
    )
    assert [(m.start_idx, m.end_idx) for m in empty.get_metadata()] == [
        (m.start_idx, m.end_idx) for m in ref.get_metadata()
    ]


def test_fill_and_unpack_round_trip_bit_exact():
    metas = [*_int4_unit("a", 8, 32), _meta("b", BF16, (4, 4)), _meta("c", F32, (2, 3))]
    plan = build_plan(metas, bucket_bytes=64)
    gen = torch.Generator().manual_seed(1)
    tensors = {m.name: _random_tensor(m.dtype, m.shape, gen) for m in metas}
    got = {}
    for bucket in plan.buckets:
        flat = allocate_bucket(bucket.nbytes)
        named = [(n, tensors[n]) for n in reversed(bucket.names())]  # any order inside a bucket
        fill_bucket(bucket, bucket_views(bucket, flat), named)
        got.update(unpack_bucket(bucket, bucket_views(bucket, flat)))
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(t.dtype), t), name


def test_fill_accepts_non_contiguous_sources():
    (bucket,) = build_plan([_meta("w", F32, (3, 4))]).buckets
    src = torch.arange(12, dtype=F32).view(4, 3).t()
    bufs = bucket_views(bucket, allocate_bucket(bucket.nbytes))
    fill_bucket(bucket, bufs, [("w", src)])
    assert torch.equal(unpack_bucket(bucket, bufs)[0][1], src)


def test_digest_is_stable_and_layout_sensitive():
    metas = [_meta("a", BF16, (8,)), _meta("b", F32, (4,))]
    d = build_plan(metas).digest()
    assert d == build_plan(list(metas)).digest()
    assert d == PINNED_DIGEST  # same value in every process and Python run (no hash())
    assert build_plan([metas[0], _meta("b", F32, (2, 2))]).digest() != d
    assert build_plan([metas[0], _meta("b", I32, (4,))]).digest() != d
    assert build_plan(metas, bucket_bytes=16).digest() != d  # different cuts
    same_dtype = [_meta("a", BF16, (8,)), _meta("b", BF16, (4,))]
    assert build_plan(same_dtype).digest() != build_plan(same_dtype[::-1]).digest()


@pytest.mark.parametrize(
    ("metas", "needle"),
    [
        ([_meta("a", BF16, (2,)), _meta("a", BF16, (2,))], "'a' appears twice"),
        ([_meta("z", BF16, (2, 0))], "'z'"),
        ([_meta("neg", F32, (-1, 4))], "'neg'"),
        (
            [
                _meta("p", BF16, (2,), "u1"),
                _meta("q", BF16, (2,), "u2"),
                _meta("r", BF16, (2,), "u1"),
            ],
            "'r': unit 'u1' reappears",
        ),
        ([TensorMeta("s", "bfloat16", (2,), "s")], "'s'"),
    ],
)
def test_bad_metadata_names_the_tensor(metas, needle):
    with pytest.raises(ValueError, match=needle):
        build_plan(metas)


def test_fill_errors_name_the_tensor():
    (bucket,) = build_plan([_meta("a", BF16, (2,), "u"), _meta("b", F32, (3,), "u")]).buckets
    bufs = bucket_views(bucket, allocate_bucket(bucket.nbytes))
    a, b = torch.zeros(2, dtype=BF16), torch.zeros(3, dtype=F32)
    with pytest.raises(ValueError, match=r"'b': got torch\.bfloat16"):
        fill_bucket(bucket, bufs, [("a", a), ("b", b.to(BF16))])
    with pytest.raises(ValueError, match=r"'a': got torch.bfloat16 \(3,\)"):
        fill_bucket(bucket, bufs, [("a", torch.zeros(3, dtype=BF16))])
    with pytest.raises(ValueError, match="'c' is not in bucket 0"):
        fill_bucket(bucket, bufs, [("a", a), ("c", b)])
    with pytest.raises(ValueError, match="missing tensors \\['b'\\]"):
        fill_bucket(bucket, bufs, [("a", a)])
    with pytest.raises(ValueError, match="'a' given twice"):
        fill_bucket(bucket, bufs, [("a", a), ("a", a)])
    with pytest.raises(ValueError, match="bucket 0: need a 1-D uint8 buffer"):
        bucket_views(bucket, allocate_bucket(bucket.nbytes - 1))


_DTYPES = st.sampled_from([BF16, F32, I32, I64, torch.uint8, torch.float16])
_UNIT = st.lists(
    st.tuples(_DTYPES, st.lists(st.integers(1, 9), min_size=0, max_size=3)), min_size=1, max_size=4
)


@settings(max_examples=150, deadline=None)
@given(units=st.lists(_UNIT, min_size=1, max_size=12), bucket_bytes=st.integers(1, 2048))
def test_property_plan_invariants(units, bucket_bytes):
    metas = [
        _meta(f"u{u}.t{i}", dtype, shape, f"u{u}")
        for u, tensors in enumerate(units)
        for i, (dtype, shape) in enumerate(tensors)
    ]
    plan = build_plan(metas, bucket_bytes=bucket_bytes)
    flat_names = [n for b in plan.buckets for g in b.groups for n in (s.name for s in g.entries)]
    assert sorted(flat_names) == sorted(m.name for m in metas)  # every tensor exactly once
    unit_bucket = {}
    for b in plan.buckets:
        units_here = {n.split(".")[0] for n in b.names()}
        for u in units_here:
            assert unit_bucket.setdefault(u, b.index) == b.index  # a unit is never split
        if b.nbytes > bucket_bytes:
            assert len(units_here) == 1  # only a single oversized unit may exceed the bound
        offset = 0
        for g in b.groups:
            assert g.byte_offset == offset and g.byte_offset % g.dtype.itemsize == 0
            offset += g.nbytes
        assert offset == b.nbytes
    # stream order is kept across buckets and inside each dtype group
    per_bucket = [sorted(int(n.split(".")[0][1:]) for n in b.names()) for b in plan.buckets]
    for a, b in itertools.pairwise(per_bucket):
        assert a[-1] < b[0]
    stream_pos = {m.name: i for i, m in enumerate(metas)}
    for b in plan.buckets:
        for g in b.groups:
            pos = [stream_pos[s.name] for s in g.entries]
            assert pos == sorted(pos)
    # greedy: merging a bucket with the next one would exceed the bound
    for a, b in itertools.pairwise(plan.buckets):
        assert a.nbytes + b.nbytes > bucket_bytes
