"""SGLang request bodies and tensor-path payloads, checked in-process against SGLang's own code."""

from __future__ import annotations

import pickle
import types

import pybase64
import pytest
import torch
from safetensors.torch import save_file

from tests.sglang_protocol_server import import_io_struct
from weightsync.engines import sglang_payloads as sp
from weightsync.engines.sglang import SGLangConfig
from weightsync.plan import TensorMeta, allocate_bucket, bucket_views, build_plan, fill_bucket
from weightsync.transport.ipc import encode_payload


@pytest.fixture(scope="module", autouse=True)
def io_struct():
    module = import_io_struct()
    sp.io_structs.cache_clear()
    assert sp.io_structs() is module
    yield module
    sp.io_structs.cache_clear()


class TrainerMeta(types.SimpleNamespace):
    """A trainer-side metadata class: SGLang's SafeUnpickler blocks it (UniRL #164)."""


def _named() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        ("model.norm.weight", torch.randn(5, generator=g)),  # fp32, odd size
        ("model.layers.0.mlp.down_proj.weight", torch.randn(3, 7, generator=g).bfloat16()),
        ("x.weight_packed", torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32)),
        ("x.weight_scale", torch.randn(3, generator=g).bfloat16()),
    ]


def _bucket_and_flat(named):
    metas = [TensorMeta(n, t.dtype, tuple(t.shape), unit="u") for n, t in named]
    (bucket,) = build_plan(metas, bucket_bytes=1 << 20).buckets
    flat = allocate_bucket(bucket.nbytes)
    fill_bucket(bucket, bucket_views(bucket, flat), named)
    return bucket, flat


def test_bodies_validate_against_sglang_structs(io_struct):
    body = sp.request_body(
        "UpdateWeightsFromDistributedReqInput",
        names=["a", "b"],
        dtypes=["bfloat16", "int32"],
        shapes=[[2, 3], [4]],
        load_format="flattened_bucket",
        flush_cache=False,
    )
    req = io_struct.UpdateWeightsFromDistributedReqInput(**body)
    assert (req.dtypes, req.flush_cache, req.group_name) == (
        ["bfloat16", "int32"],
        False,
        "weight_update_group",
    )
    assert sp.request_body("PauseGenerationReqInput", mode="in_place") == {"mode": "in_place"}
    assert sp.request_body("EndWeightUpdateReqInput") == {}
    body = sp.request_body("UpdateWeightVersionReqInput", new_version="3", abort_all_requests=False)
    assert body == {"new_version": "3", "abort_all_requests": False}


@pytest.mark.parametrize(
    ("struct", "fields", "field"),
    [
        ("PauseGenerationReqInput", {"mode": "pause"}, "mode"),
        ("UpdateWeightsFromDistributedReqInput", {"names": ["a"], "dtypes": ["x"]}, "shapes"),
        (
            "UpdateWeightsFromDistributedReqInput",
            {"names": ["a"], "dtypes": ["bfloat16"], "shapes": [["two"]]},
            "shapes.0.0",
        ),
        ("UpdateWeightsFromTensorReqInput", {"serialized_named_tensors": ["not base64!"]}, ""),
        ("InitWeightsUpdateGroupReqInput", {"master_address": "h", "master_port": "p"}, "port"),
    ],
)
def test_bad_body_names_the_field(struct, fields, field):
    with pytest.raises(ValueError, match=rf"{struct}: invalid field.*{field}"):
        sp.request_body(struct, **fields)


def test_payload_is_sglangs_wire_format():
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    named = _named()
    bucket, flat = _bucket_and_flat(named)
    payload = encode_payload(bucket, flat)
    sp.check_payload(payload, bucket, rank=0)
    obj = MultiprocessingSerializer.deserialize(payload)  # SafeUnpickler, as the scheduler does
    rebuilt = FlattenedTensorBucket(
        flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]
    ).reconstruct_tensors()
    expected = dict(named)
    assert [n for n, _ in rebuilt] == bucket.names()
    for name, tensor in rebuilt:
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor.view(torch.uint8), expected[name].view(torch.uint8))


def test_payload_checks_reject_what_would_kill_the_scheduler():
    named = _named()
    bucket, _ = _bucket_and_flat(named)
    other, other_flat = _bucket_and_flat(named[:2])
    with pytest.raises(ValueError, match=r"rank 1: metadata .* does not match the plan"):
        sp.check_payload(encode_payload(other, other_flat), bucket, rank=1)

    rogue = pybase64.b64encode(pickle.dumps({"metadata": [TrainerMeta(name="a")]})).decode()
    with pytest.raises(ValueError, match="cannot unpickle it: Blocked unsafe global"):
        sp.check_payload(rogue, bucket, rank=0)
    as_list = pybase64.b64encode(pickle.dumps([("a", 1)])).decode()
    with pytest.raises(ValueError, match="flattened_tensor and metadata"):
        sp.check_payload(as_list, bucket, rank=0)


def test_manifest_and_meta_checks(tmp_path):
    named = dict(_named())
    save_file(named, tmp_path / "model.safetensors")
    manifest = sp.manifest_from_checkpoint(tmp_path)
    assert manifest["x.weight_packed"] == sp.TensorSpec(torch.int32, (2, 3))
    sp.check_meta("model.norm.weight", torch.float32, (5,), manifest)
    with pytest.raises(ValueError, match="'nope' is not in the engine's checkpoint"):
        sp.check_meta("nope", torch.float32, (5,), manifest)
    with pytest.raises(ValueError, match=r"'model.norm.weight': the update sends bfloat16 \(5,\)"):
        sp.check_meta("model.norm.weight", torch.bfloat16, (5,), manifest)
    with pytest.raises(ValueError, match=r"sends float32 \(6,\), the engine's checkpoint has"):
        sp.check_meta("model.norm.weight", torch.float32, (6,), manifest)
    with pytest.raises(ValueError, match="holds no"):
        sp.manifest_from_checkpoint(tmp_path / "missing")


def test_non_finite_tensor_is_named():
    t = torch.ones(4, dtype=torch.bfloat16)
    t[2] = float("nan")
    with pytest.raises(ValueError, match=r"tensor 'w': 1 non-finite value"):
        sp.check_tensor("w", t, None)
    sp.check_tensor("w", torch.ones(4, dtype=torch.bfloat16), sp.TensorSpec(torch.bfloat16, (4,)))


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"url": "localhost:30000"}, "url"),
        ({"tp_size": 0}, "tp_size"),
        ({"path": "nccl"}, "path"),
        ({"flush_backoff_s": 9.0}, "flush_backoff_s"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_config_rejects(fields, bad):
    with pytest.raises(ValueError, match=rf"SGLangConfig\.{bad}="):
        SGLangConfig(**{"url": "http://127.0.0.1:1", **fields})


def test_bodies_without_io_struct_still_check_choices(monkeypatch):
    monkeypatch.setattr(sp, "io_structs", lambda: None)  # as on a machine where it won't import
    assert sp.request_body("PauseGenerationReqInput", mode="retract") == {"mode": "retract"}
    with pytest.raises(ValueError, match=r"mode: 'freeze' is not one of"):
        sp.request_body("PauseGenerationReqInput", mode="freeze")
