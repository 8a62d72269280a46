"""Offline HF checkpoint -> int4 pack-quantized checkpoint, one shard at a time.

Memory stays at about one input shard plus its packed output: shards are read lazily with
``safe_open``, quantized by a thread pool (the packer releases the GIL), written, and dropped
before the next shard is opened. Output shards keep their input names, so the index maps
names the same way the source does.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from weightsync.quant.config import Int4Config
from weightsync.quant.int4 import FLOAT_DTYPES
from weightsync.quant.stream import packed_meta, quantize_named
from weightsync.tensors import ST_DTYPES

INDEX = "model.safetensors.index.json"


def _source_shards(src: Path) -> list[str]:
    if (src / INDEX).exists():
        weight_map = json.loads((src / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{src}: no *.safetensors files and no {INDEX}")
    return shards


def _validate(src: Path, shards: list[str], cfg: Int4Config) -> None:
    """Check every targeted tensor from the headers alone: bad input fails before any write."""
    for shard in shards:
        with safe_open(str(src / shard), framework="pt") as f:
            names = list(f.keys())
            for name in names:
                view = f.get_slice(name)
                dtype = ST_DTYPES.get(view.get_dtype())  # None: a code torch cannot hold
                if cfg.is_quantized(name, view.get_shape()) and dtype not in FLOAT_DTYPES:
                    raise ValueError(f"{name}: dtype {view.get_dtype()} cannot be int4-quantized")
                packed_meta(name, tuple(view.get_shape()), dtype, cfg)


def _convert_shard(path: Path, cfg: Int4Config, pool: ThreadPoolExecutor, bar: tqdm):
    with safe_open(str(path), framework="pt") as f:

        def one(name: str) -> list[tuple[str, torch.Tensor]]:
            tensor = f.get_tensor(name)
            out = quantize_named(name, tensor, cfg)
            bar.update(tensor.numel() * tensor.element_size())
            return out

        names = list(f.keys())
        futures = [pool.submit(one, name) for name in names]
        # Every worker must be done with the file before it is closed, even when one failed.
        wait(futures)
        results = [fut.result() for fut in futures]
    return {name: t.contiguous() for pairs in results for name, t in pairs}


def convert_checkpoint(
    src: str | Path, dst: str | Path, cfg: Int4Config, *, workers: int = 2, progress: bool = True
) -> dict[str, str]:
    """Write the int4 checkpoint of ``src`` to ``dst``; returns the new weight map."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(
            f"{src}/config.json already has a quantization_config; "
            "convert an unquantized checkpoint"
        )
    shards = _source_shards(src)
    _validate(src, shards, cfg)
    total = sum((src / s).stat().st_size for s in shards)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="convert") as pool,
        tqdm(
            total=total, unit="B", unit_scale=True, disable=not progress, desc="convert-int4"
        ) as bar,
    ):
        for shard in shards:
            tensors = _convert_shard(src / shard, cfg, pool, bar)
            save_file(tensors, str(dst / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            del tensors
    size = sum((dst / s).stat().st_size for s in shards)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / INDEX).write_text(json.dumps(index, indent=2))
    config["quantization_config"] = cfg.to_quantization_config()
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if (
            extra.is_file()
            and extra.suffix != ".safetensors"
            and extra.name not in ("config.json", INDEX)
        ):
            shutil.copy2(extra, dst / extra.name)
    return weight_map
