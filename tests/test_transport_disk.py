"""Disk transport: versioned safetensors directories, written in one process, read in another."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.test_transport_base import CTX, make_tensor, mismatches, mixed_metas, run_workers
from weightsync.plan import build_plan, fill_bucket
from weightsync.transport.base import send_stream
from weightsync.transport.disk import INDEX, MANIFEST, DiskStore

BUCKET_BYTES = 4096


def _write(root: str, version: str, seed: int, keep_last: int = 2) -> list[str]:
    store = DiskStore(root, keep_last=keep_last)
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    stream = ((m.name, make_tensor(m, seed)) for m in mixed_metas())
    with store.begin(version) as writer:
        tickets = []
        send_stream(writer, plan, stream, lambda b, t: tickets.append(t))
        writer.commit()
    return [t.payloads[0] for t in tickets]


def _read(root: str, version: str, seed: int) -> dict:
    named = list(DiskStore(root).read(version))
    return {"bad": mismatches(named, mixed_metas(), seed), "count": len(named)}


@pytest.mark.slow
def test_disk_round_trip_across_processes_bit_exact(tmp_path):
    (shards,) = run_workers([(_write, (str(tmp_path), "step-1", 5))])
    (got,) = run_workers([(_read, (str(tmp_path), "step-1", 5))])
    assert got == {"bad": [], "count": len(mixed_metas())}
    vdir = tmp_path / "step-1"
    assert sorted(p.name for p in vdir.iterdir()) == sorted([*shards, INDEX, MANIFEST])
    index = json.loads((vdir / INDEX).read_text())
    assert set(index["weight_map"]) == {m.name for m in mixed_metas()}
    # each shard is a plain safetensors file for the reference reader too
    loaded = {}
    for shard in shards:
        loaded.update(load_file(vdir / shard))
    assert mismatches(list(loaded.items()), mixed_metas(), 5) == []
    manifest = json.loads((vdir / MANIFEST).read_text())
    meta = {m.name: m for m in mixed_metas()}
    for name, info in manifest["tensors"].items():
        assert info["dtype"] == str(meta[name].dtype).removeprefix("torch.")
        assert tuple(info["shape"]) == meta[name].shape


def test_keeps_last_n_versions_and_refuses_to_overwrite(tmp_path):
    for i in range(4):
        _write(str(tmp_path), f"v{i}", seed=i)
    store = DiskStore(tmp_path)
    assert store.versions() == ["v2", "v3"] and store.latest() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v2", "v3"]  # no temp or trash left
    assert _read(str(tmp_path), "v2", 2)["bad"] == []
    with pytest.raises(ValueError, match="version 'v3' already exists"):
        store.begin("v3")
    with pytest.raises(ValueError, match="must be a plain directory name"):
        store.begin("../escape")


def test_corruption_is_detected_naming_the_file(tmp_path):
    shards = _write(str(tmp_path), "v", seed=1)
    store = DiskStore(tmp_path)
    path = tmp_path / "v" / shards[1]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"file {shards[1]} fails its sha256 check"):
        list(store.read("v"))
    path.write_bytes(bytes(data[:-4]))
    with pytest.raises(ValueError, match=f"file {shards[1]} is missing or truncated"):
        store.verify("v")


def test_failed_write_publishes_nothing(tmp_path):
    store = DiskStore(tmp_path)
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    wrong = ((m.name, make_tensor(m, 1).to(torch.float64)) for m in mixed_metas())
    with pytest.raises(ValueError, match=r"got torch\.float64"), store.begin("v") as writer:
        send_stream(writer, plan, wrong, lambda b, t: None)
    assert store.versions() == [] and list(tmp_path.iterdir()) == []


def _write_and_die(root: str) -> None:
    store = DiskStore(root)
    writer = store.begin("never")
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    bucket = plan.buckets[0]
    stream = ((m.name, make_tensor(m, 1)) for m in mixed_metas())
    fill_bucket(bucket, writer.buffers(bucket), [next(stream) for _ in range(bucket.num_tensors)])
    writer.send(bucket, writer.buffers(bucket))
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.slow
def test_killed_writer_leaves_no_version_and_its_temp_dir_is_swept(tmp_path):
    proc = CTX.Process(target=_write_and_die, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL
    (tmp,) = list(tmp_path.iterdir())
    assert tmp.name.startswith(".tmp-never-") and DiskStore(tmp_path).versions() == []
    _write(str(tmp_path), "next", seed=2)  # the next writer sweeps the dead one's temp dir
    assert [p.name for p in tmp_path.iterdir()] == ["next"]
