"""Disk transport: versioned safetensors directories, written in one process, read in another."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.test_transport_base import (
    CTX,
    make_tensor,
    mismatches,
    mixed_metas,
    run_workers,
)
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


def test_every_file_is_fsynced_before_the_manifest_names_it(tmp_path, monkeypatch):
    synced: list[int] = []  # inodes, in fsync order
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))
    )
    extra = tmp_path / "config.json"
    extra.write_text("{}")
    store = DiskStore(tmp_path / "store")
    plan = build_plan(mixed_metas(), bucket_bytes=BUCKET_BYTES)
    stream = ((m.name, make_tensor(m, 3)) for m in mixed_metas())
    with store.begin("v1", extra_files=[extra]) as writer:
        send_stream(writer, plan, stream, lambda b, t: None)
        final = writer.commit()
    manifest_at = synced.index((final / MANIFEST).stat().st_ino)
    for p in final.iterdir():
        if p.name != MANIFEST:
            assert p.stat().st_ino in synced[:manifest_at], f"{p.name} not fsynced first"


def _corrupt(store_root, version: str, **changes) -> None:
    path = store_root / version / MANIFEST
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(manifest | changes))


def test_manifest_names_outside_the_version_and_unreadable_manifests_are_refused(tmp_path):
    _write(str(tmp_path), "a", seed=1, keep_last=5)
    _write(str(tmp_path), "b", seed=2, keep_last=5)
    _write(str(tmp_path), "c", seed=3, keep_last=5)
    store = DiskStore(tmp_path, keep_last=5)
    shards = json.loads((tmp_path / "b" / MANIFEST).read_text())["shards"]
    _corrupt(tmp_path, "b", shards=["../a/" + shards[0]])
    (tmp_path / "c" / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match=r"version 'b': manifest names files outside it"):
        list(store.read("b", verify=False))
    with pytest.raises(ValueError, match=r"version 'c': unreadable manifest"):
        store.verify("c")
    assert store.versions() == ["a"] and store.latest() == "a"  # the others are skipped
    _write(str(tmp_path), "d", seed=4, keep_last=5)  # and commit still works
    assert store.versions() == ["a", "d"]


def test_sweep_leaves_other_hosts_temp_dirs_alone(tmp_path):
    from weightsync.transport.base import host_tag

    dead = 2**22 + 17  # above pid_max's default: no such process here
    other = "f" * 8 if host_tag() != "f" * 8 else "e" * 8
    ours = tmp_path / f".tmp-x-{host_tag()}-{dead}-0123abcd"
    theirs = tmp_path / f".tmp-x-{other}-{dead}-0123abcd"
    ours.mkdir()
    theirs.mkdir()
    _write(str(tmp_path), "v", seed=1)  # a new writer sweeps
    assert not ours.exists() and theirs.exists()
