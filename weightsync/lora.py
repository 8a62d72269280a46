"""LoRA adapter-only sync: the base stays frozen on the engines, each update moves the adapter.

The trainer's source rank exports the adapter (``megatron_bridge.export_lora``: PEFT names plus
``adapter_config.json``); every engine loads it under a new name ``<name>@v<version>`` through
its own runtime adapter API, so requests already running on the previous adapter finish on it,
and new rollouts ask for the new name. Engines that load adapters from memory (SGLang's
``load_adapter_tensors``) get it from the source rank directly; for the others (vLLM) it is
written as one directory on a local tmpfs, whole or not at all (written under a temporary
name, fsynced, renamed), and they load that path. Nothing is paused: the base weights are not
touched, and each engine loads the adapter atomically on its side. ``adapter_digests`` is what
``verify`` holds an engine's LoRA slots to.

An engine loads whatever is at the path it is given, so adapters are written only into a
directory no other local user can change (``weightsync.private_dir``): the default root is in
/dev/shm, where another user may have created it first. A root that fails is refused with
ValueError before anything is written, and so before any engine is asked to load it.

Settings: ``weightsync.config.LoraSync``. An engine keeps the last ``keep`` versions loaded:
rollouts of the previous version may still run when the next one is published (one-step
off-policy loops); older ones are unloaded and their directories removed. A base update
(``WeightSync.update``) unloads them all: an adapter trained against the old base no longer
applies.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from weightsync.private_dir import private_dir

if TYPE_CHECKING:
    import torch

    from weightsync.config import LoraSync

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def check_root(lora: LoraSync) -> Path:
    """``LoraSync.root``, created or accepted as a private directory, or ValueError naming
    it: the check for callers that want it before anything is written (nothing is created
    below it: engines that take adapters in memory leave it empty)."""
    return _private(Path(lora.root))


def adapter_dir(lora: LoraSync, sync_id: str) -> Path:
    """Where WeightSync ``sync_id`` writes its adapters (the parent of ``LoraSync.path``),
    created or accepted as a private directory, or ValueError naming ``LoraSync.root``. The
    check ``write_adapter`` makes, for callers that want it earlier."""
    return _private(Path(lora.root) / sync_id)


def _private(path: Path) -> Path:
    try:
        return private_dir(path)
    except ValueError as e:
        raise ValueError(f"LoraSync.root: {e}") from None


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """The adapter as PEFT saves it, at ``path``, whole or not at all; returns its bytes.
    ``path.parent`` must be a private directory (``adapter_dir``): ValueError otherwise,
    before anything is written."""
    from safetensors.torch import save_file

    path = _private(path.parent) / path.name
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / ADAPTER_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        for f in (ADAPTER_FILE, CONFIG_FILE):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():  # a version written again (a retried update) replaces the old one
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(t.numel() * t.element_size() for t in tensors.values())


def adapter_digests(tensors: dict[str, torch.Tensor], config: dict, seed: int) -> dict[str, str]:
    """The probe digests (``weightsync.probe``) an engine's LoRA slots read back when they
    hold exactly this adapter: A as written, B times ``lora_alpha / r`` rounded once to its
    dtype, as vLLM folds the scaling into B when it loads an adapter."""
    from weightsync.probe import probe_digest

    scaling = config["lora_alpha"] / config["r"]
    return {
        name: probe_digest(
            t * scaling if name.endswith("lora_B.weight") and scaling != 1 else t, seed
        )
        for name, t in tensors.items()
    }


def remove_adapter(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, name: str, keep: set[str]) -> list[str]:
    """Remove every version of adapter ``name`` under ``root`` whose directory is not in
    ``keep`` (the versions the engines hold: an engine may read a loaded adapter's directory
    again after evicting it from its CPU cache). Whatever else is there is a failed load's
    or an earlier run's leftover. Returns the names removed."""
    gone = sorted(p.name for p in root.glob(f"{glob.escape(name)}@v*") if p.name not in keep)
    for n in gone:
        remove_adapter(root / n)
    return gone
