"""The vLLM adapter's pure parts: the JSON wire format, checkpoint headers, launcher command."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

from weightsync.engines.vllm_plugin.receive import checkpoint_params
from weightsync.engines.vllm_plugin.wire import InitInfo, UpdateInfo, update_info
from weightsync.plan import TensorMeta, build_plan
from weightsync.tensors import sha256
from weightsync.transport.base import Ticket

METAS = [
    TensorMeta("a.weight_packed", torch.int32, (8, 2), "a"),
    TensorMeta("a.weight_scale", torch.bfloat16, (8, 1), "a"),
    TensorMeta("a.weight_shape", torch.int64, (2,), "a"),
    TensorMeta("b.weight", torch.bfloat16, (4, 16), "b"),
]


def test_bucket_round_trips_through_json():
    plan = build_plan(METAS, bucket_bytes=1 << 20)
    bucket = plan.buckets[0]
    ticket = Ticket(bucket.index, slot=1, payloads=("x",))
    wire = json.loads(json.dumps(asdict(update_info(bucket, ticket))))
    assert UpdateInfo(**wire).to_bucket() == (bucket, ticket)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("dtype", "float8_e9", "unknown dtype"),
        ("numel", 1, "does not fit"),
    ],
)
def test_malformed_bucket_names_the_problem(field, value, match):
    bucket = build_plan(METAS, bucket_bytes=1 << 20).buckets[0]
    wire = asdict(update_info(bucket, Ticket(0)))
    wire["groups"][0][field] = value
    with pytest.raises(ValueError, match=match):
        UpdateInfo(**wire).to_bucket()


def test_wrong_shape_in_entry_is_refused():
    bucket = build_plan(METAS, bucket_bytes=1 << 20).buckets[0]
    wire = asdict(update_info(bucket, Ticket(0)))
    wire["groups"][0]["entries"][0][1] = [3, 3]
    with pytest.raises(ValueError, match="does not fit"):
        UpdateInfo(**wire).to_bucket()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(transport="carrier-pigeon"), "transport"),
        (
            dict(
                transport="broadcast",
                master_address="h",
                master_port=1,
                group_name="g",
                world_size=2,
                rank_offset=2,
            ),
            "rank_offset",
        ),
        (dict(transport="broadcast", master_port=1, group_name="g", world_size=2), "master"),
        (dict(transport="shm"), "slot_names"),
        (
            dict(
                transport="shm",
                slot_names=["wsync-0123abcd-1-0123456789ab-0"],
                slot_bytes=8,
                consumer_index=1,
            ),
            "consumer",
        ),
        (dict(transport="shm", slot_names=["s"], slot_bytes=8, timeout_s=0), "timeout_s"),
    ],
)
def test_init_info_is_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InitInfo(**kwargs)


def test_checkpoint_params_read_safetensors_headers(tmp_path):
    tensors = {
        "x.weight": torch.zeros(3, 4, dtype=torch.bfloat16),
        "x.weight_packed": torch.zeros(3, 1, dtype=torch.int32),
        "x.weight_shape": torch.tensor([3, 8]),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert checkpoint_params(str(tmp_path)) == {
        "x.weight": ["bfloat16", [3, 4]],
        "x.weight_packed": ["int32", [3, 1]],
        "x.weight_shape": ["int64", [2]],
    }
    with pytest.raises(ValueError, match="no safetensors"):
        checkpoint_params(str(tmp_path / "nowhere"))


def test_sha256_covers_every_byte():
    t = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
    u = t.clone()
    u[1, 2] = 7
    assert sha256(t) == sha256(t.clone()) != sha256(u)
    assert sha256(t.t()) != sha256(t)  # layout matters: the bytes sent are the contiguous ones


def test_launcher_command_and_env(tmp_path):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    with pytest.raises(ValueError, match=r"config\.json"):
        VllmServerConfig(model_dir=str(tmp_path), log_path=str(tmp_path / "log"))
    (tmp_path / "config.json").write_text("{}")
    server = VllmServer(VllmServerConfig(model_dir=str(tmp_path), log_path="l", api_key="k"))
    cmd = server.command()
    assert cmd[cmd.index("--model") + 1] == str(tmp_path)
    assert "k" not in cmd and server.env()["VLLM_API_KEY"] == "k"  # not in /proc/*/cmdline
    assert json.loads(cmd[cmd.index("--weight-transfer-config") + 1]) == {"backend": "weightsync"}
    assert server.env()["VLLM_SERVER_DEV_MODE"] == "1"
    assert server.url == f"http://127.0.0.1:{server.port}" and server.pid is None


def test_shm_init_info_refuses_names_that_are_not_ring_names():
    with pytest.raises(ValueError, match=r"RingSpec\.names"):
        InitInfo(transport="shm", slot_names=["../../etc/passwd"], slot_bytes=4096)
    name = "wsync-0123abcd-12-0123456789ab-0"
    assert InitInfo(transport="shm", slot_names=[name], slot_bytes=4096).slot_names == [name]
