"""A versioned directory of safetensors shards with a checksum manifest.

For engines that reload from a directory (SGLang ``update_weights_from_disk``, vLLM reload) and
for moving weights across clusters. Layout under ``root``::

    <version>/model-00000.safetensors ...   one shard per bucket
    <version>/model.safetensors.index.json  the HF weight map, so loaders find every tensor
    <version>/manifest.json                 sha256 + size per file, name/dtype/shape per tensor
    <version>/config.json ...               extra files copied in (checksummed too)

A version is written into ``.tmp-<version>-<pid>-<token>`` in the same parent and renamed into
place only when complete, so a reader sees a whole version or none. A shard is the bucket's
byte layout (``weightsync.plan``: unpadded, each tensor at a multiple of its element size)
behind a safetensors header, written in one go without re-packing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsync.plan import Bucket, bucket_views, unpack_bucket
from weightsync.tensors import ST_CODES, dtype_name
from weightsync.transport.base import Ticket, host_tag, pid_alive

log = logging.getLogger("weightsync")
MANIFEST = "manifest.json"
INDEX = "model.safetensors.index.json"
FORMAT = "weightsync-disk/1"


def _check_version(version: str) -> None:
    if not version or version.startswith(".") or "/" in version or version in {".", ".."}:
        raise ValueError(f"version={version!r} must be a plain directory name not starting '.'")


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, bucket: Bucket, flat: torch.Tensor) -> None:
    """Write ``bucket``'s bytes (in ``flat``, CPU) as one safetensors file."""
    header: dict[str, object] = {}
    for g in bucket.groups:
        if g.dtype not in ST_CODES:
            raise ValueError(
                f"tensor {g.entries[0].name!r}: dtype {g.dtype} has no safetensors "
                f"name; allowed {sorted(map(str, ST_CODES))}"
            )
        for s in g.entries:
            start = g.byte_offset + s.offset * g.dtype.itemsize
            header[s.name] = {
                "dtype": ST_CODES[g.dtype],
                "shape": list(s.shape),
                "data_offsets": [start, start + s.numel * g.dtype.itemsize],
            }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.write(memoryview(flat[: bucket.nbytes].numpy()))
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True, slots=True)
class DiskStore:
    """Committed versions under ``root``; the newest ``keep_last`` survive each commit."""

    root: Path
    keep_last: int = 2

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ValueError(f"keep_last={self.keep_last} must be >= 1")
        object.__setattr__(self, "root", Path(self.root))
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[str]:
        """Committed versions, oldest first (by commit sequence). A version whose manifest
        cannot be read or names files outside its directory is skipped (and logged): one bad
        directory must not hide the others."""
        found = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not (p / MANIFEST).is_file():
                continue
            try:
                found.append((self._manifest(p.name)["seq"], p.name))
            except ValueError as e:
                log.warning("weightsync disk store: skipping %s: %s", p.name, e)
        return [v for _, v in sorted(found)]

    def latest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        _check_version(version)
        return self.root / version

    def _manifest(self, version: str) -> dict:
        """The parsed manifest; ValueError naming the version if it is unreadable or names a
        file that is not a plain name inside the version directory."""
        try:
            with open(self.root / version / MANIFEST) as f:
                manifest = json.load(f)
            names = [*manifest["files"], *manifest["shards"]]
            if not isinstance(manifest["seq"], int):
                raise TypeError("seq is not an integer")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"version {version!r}: unreadable manifest ({e})") from e
        bad = [n for n in names if not isinstance(n, str) or not _plain_name(n)]
        if bad:
            raise ValueError(f"version {version!r}: manifest names files outside it: {bad[:3]}")
        return manifest

    def begin(self, version: str, extra_files: Sequence[Path] = ()) -> DiskSender:
        if self.path(version).exists():
            raise ValueError(f"version {version!r} already exists under {self.root}")
        _sweep_dead_temps(self.root)
        tmp = self.root / f".tmp-{version}-{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for extra in map(Path, extra_files):
            shutil.copyfile(extra, tmp / extra.name)
            _fsync_file(tmp / extra.name)
        return DiskSender(self, version, tmp)

    def verify(self, version: str) -> dict:
        """Check every file against the manifest; return the manifest or raise ValueError."""
        manifest = self._manifest(version)
        for name, info in manifest["files"].items():
            path = self.path(version) / name
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise ValueError(f"version {version!r}: file {name} is missing or truncated")
            if _sha256(path) != info["sha256"]:
                raise ValueError(f"version {version!r}: file {name} fails its sha256 check")
        return manifest

    def read(self, version: str, verify: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of a committed version, checksums verified first."""
        from safetensors import safe_open

        manifest = self.verify(version) if verify else self._manifest(version)
        for shard in manifest["shards"]:
            with safe_open(self.path(version) / shard, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    yield name, f.get_tensor(name)

    def _prune(self) -> None:
        for version in self.versions()[: -self.keep_last]:
            trash = self.root / f".trash-{version}-{uuid.uuid4().hex[:8]}"
            os.rename(self.root / version, trash)  # atomic for readers; then delete at leisure
            shutil.rmtree(trash, ignore_errors=True)


def _sweep_dead_temps(root: Path) -> None:
    """Temp dirs of dead writers of this host (on shared storage, others' are not ours to
    judge), and trash left by an interrupted prune."""
    for p in root.glob(".tmp-*"):
        tag, pid = p.name.rsplit("-", 3)[-3:-1]
        if tag == host_tag() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)


class DiskSender:
    """Writes one version bucket by bucket (the Sender protocol); ``commit`` publishes it."""

    def __init__(self, store: DiskStore, version: str, tmp: Path) -> None:
        self.store, self.version, self.tmp = store, version, tmp
        self._staging = torch.empty(0, dtype=torch.uint8)  # reused across buckets
        self._shards: list[str] = []
        self._tensors: dict[str, dict] = {}

    def buffers(self, bucket: Bucket) -> dict[torch.dtype, torch.Tensor]:
        if self._staging.numel() < bucket.nbytes:
            self._staging = torch.empty(bucket.nbytes, dtype=torch.uint8)
        return bucket_views(bucket, self._staging)

    def send(self, bucket: Bucket, buffers: dict[torch.dtype, torch.Tensor]) -> Ticket:
        shard = f"model-{bucket.index:05d}.safetensors"
        write_shard(self.tmp / shard, bucket, self._staging)
        self._shards.append(shard)
        for name, t in unpack_bucket(bucket, buffers):
            self._tensors[name] = {
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "file": shard,
            }
        return Ticket(bucket.index, payloads=(shard,))

    def acknowledge(self, ticket: Ticket) -> None:
        """Nothing to do: a written shard needs no receiver."""

    def flush(self) -> None:
        """Shards are fsynced as they are written."""

    def commit(self) -> Path:
        """Write index and manifest, then rename the version into place; prune old ones."""
        weight_map = {n: info["file"] for n, info in self._tensors.items()}
        with open(self.tmp / INDEX, "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
        _fsync_file(self.tmp / INDEX)  # every file is durable before the manifest names it
        files = {
            p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(self.tmp.iterdir())
        }
        previous = self.store.versions()
        seq = self.store._manifest(previous[-1])["seq"] + 1 if previous else 0
        manifest = {
            "format": FORMAT,
            "version": self.version,
            "seq": seq,
            "created": time.time(),
            "files": files,
            "shards": self._shards,
            "tensors": self._tensors,
        }
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        final = self.store.path(self.version)
        os.rename(self.tmp, final)  # raises if the version appeared meanwhile
        _fsync_dir(self.store.root)
        self.store._prune()
        return final

    def close(self) -> None:
        """Drop an uncommitted version (no-op after commit)."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.tmp)

    def __enter__(self) -> DiskSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
