"""HF tensors -> this rank's megatron shards (the inverse of export). No communication.

Every rank reads the full HF tensors it needs (a dict, or lazily from the safetensors files of
a checkpoint directory) and slices its own shard locally, which sidesteps scatter collectives.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_bridge.chunks import check_coverage, holds, local_tensors, lookup, unwrap
from megatron_bridge.families import get_family
from megatron_bridge.families.base import VOCAB, Dims
from megatron_bridge.gather import is_sharded, shard_of
from megatron_bridge.model import as_hf_config
from megatron_bridge.parallel import Layout, current_layout
from megatron_bridge.units import plan_units


class _SafetensorsDir(Mapping[str, torch.Tensor]):
    """Read-on-demand view of a checkpoint directory's ``*.safetensors`` files."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors files")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def hf_source(hf_weights: Mapping[str, torch.Tensor] | str | Path) -> Mapping[str, torch.Tensor]:
    if isinstance(hf_weights, Mapping):
        return hf_weights
    path = Path(hf_weights)
    if not path.is_dir():
        raise ValueError(f"hf weights {str(path)!r} is neither a mapping nor a directory")
    return _SafetensorsDir(path)


# transformers 5 keeps routed experts fused in memory (``experts.gate_up_proj`` [E, 2F, H] with
# gate first, ``experts.down_proj`` [E, H, F]); checkpoints and engines use per-expert names.
_PER_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight")


def _fused_names(name: str) -> list[str]:
    m = _PER_EXPERT.fullmatch(name)
    return [m[1] + "gate_up_proj", m[1] + "down_proj"] if m else []


def _lookup(source: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    if name in source:
        return source[name]
    m = _PER_EXPERT.fullmatch(name)
    if not m:
        return None
    prefix, expert, which = m[1], int(m[2]), m[3]
    fused = prefix + ("down_proj" if which == "down" else "gate_up_proj")
    if fused not in source:
        return None
    t = source[fused][expert]
    return t if which == "down" else t.chunk(2, dim=0)[which == "up"]


def read_hf(source: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = _lookup(source, name)
    if t is None:
        raise ValueError(f"HF tensor {name!r} is missing from the checkpoint")
    if tuple(t.shape) != shape:
        raise ValueError(f"HF tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


@dataclass(frozen=True)
class _Local:
    """This rank's side of a load: the units, its layout and its parameters by name."""

    units: list
    layout: Layout
    d: Dims
    tensors: list[dict[str, torch.Tensor]]

    def held_pieces(self) -> Iterator[tuple[Any, torch.Tensor, bool]]:
        """(piece, local parameter, is expert) for every piece of a unit this rank holds."""
        for unit in self.units:
            if holds(unit, self.layout):
                for piece in unit.pieces:
                    local = lookup(self.tensors[unit.vp_stage], piece.mcore)
                    yield piece, local, unit.expert_owner is not None


def _local(model_chunks: Sequence[nn.Module], hf_config: Any) -> _Local:
    cfg = as_hf_config(hf_config)
    units = plan_units(cfg, unwrap(model_chunks[0]).config)
    layout = current_layout()
    d = get_family(cfg).dims(cfg)
    tensors = local_tensors(model_chunks)
    check_coverage(units, tensors, model_chunks, layout, d)
    return _Local(units, layout, d, tensors)


def load_hf_weights(
    model_chunks: Sequence[nn.Module],
    hf_weights: Mapping[str, torch.Tensor] | str | Path,
    hf_config: Any,
) -> None:
    """Copy HF weights (a state dict or a safetensors checkpoint dir) into this rank's shards.

    Extra HF tensors raise ``ValueError``, except ``lm_head.weight`` of a tied model.
    """
    here = _local(model_chunks, hf_config)
    d, layout = here.d, here.layout
    source = hf_source(hf_weights)
    known = {n for u in here.units for p in u.pieces for n in p.hf}
    known |= {f for n in known for f in _fused_names(n)} | ({"lm_head.weight"} if d.tied else set())
    extra = sorted(set(source) - known)
    if extra:
        raise ValueError(
            f"HF tensors with no megatron parameter: {extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    with torch.no_grad():
        for piece, local, expert in here.held_pieces():
            hf = [read_hf(source, n, s) for n, s in zip(piece.hf, piece.shapes, strict=True)]
            local.copy_(local_shard(local, piece.kind.to_mcore, hf, d, layout, expert, piece.mcore))
        # Under pipeline parallelism the last stage keeps its own copy of a tied output layer.
        head = here.tensors[-1].get("output_layer.weight")
        if d.tied and head is not None and layout.pp_rank == layout.pp - 1:
            embed = [read_hf(source, "model.embed_tokens.weight", (d.vocab, d.hidden))]
            head.copy_(
                local_shard(head, VOCAB.to_mcore, embed, d, layout, False, "output_layer.weight")
            )


def check_local_shapes(model_chunks: Sequence[nn.Module], hf_config: Any) -> None:
    """ValueError naming the first local parameter whose shape disagrees with ``hf_config``
    (a model built from another config). No communication and no bytes: the load's own slicing
    runs on meta tensors. Export and load would fail on it too, but only midway."""
    here = _local(model_chunks, hf_config)
    for piece, local, expert in here.held_pieces():
        hf = [torch.empty(s, device="meta") for s in piece.shapes]
        try:
            local_shard(local, piece.kind.to_mcore, hf, here.d, here.layout, expert, piece.mcore)
        except RuntimeError as e:  # a view or cat that the wrong shape cannot make
            raise ValueError(
                f"{piece.mcore}: local shard {tuple(local.shape)} does not fit the HF "
                f"shapes {[tuple(s) for s in piece.shapes]} of {piece.hf}: {e}"
            ) from e


def local_shard(
    local: torch.Tensor,
    to_mcore: Any,
    hf: list[torch.Tensor],
    d: Dims,
    layout: Layout,
    expert: bool,
    name: str,
) -> torch.Tensor:
    """This rank's shard of the HF tensors, in ``local``'s layout; ValueError if the shapes
    disagree."""
    rank, world = (layout.etp_rank, layout.etp) if expert else (layout.tp_rank, layout.tp)
    full_shape = list(local.shape)
    if is_sharded(local):
        full_shape[local.partition_dim] *= world
    full = to_mcore([t.to(local.dtype) for t in hf], d, tuple(full_shape))
    if is_sharded(local) and world > 1:
        full = shard_of(full, local.partition_dim, local.partition_stride, rank, world)
    if full.shape != local.shape:
        raise ValueError(
            f"{name}: HF tensors give shape {tuple(full.shape)}, local shard is "
            f"{tuple(local.shape)}"
        )
    return full
