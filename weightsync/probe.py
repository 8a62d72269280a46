"""Probe digests of a LoRA adapter: what ``verify`` compares between the adapter the trainer
wrote and the one an engine's LoRA slots hold (``weightsync.lora``, ``lora_readback``); and the
int4 column dequantize both proofs share. (Base weights are proven by ``weightsync.proof``.)

A handful of columns, chosen afresh per update from a seed, are read from every A and B and
digested (sha256 of dtype, shape and bytes); a TP>1 engine's ranks send their pieces, put back
together here.

Legend: ``w_OI`` a weight [out, in]; ``cols_C`` the probed input columns.
"""

from __future__ import annotations

from base64 import b64decode, b64encode

import torch

from weightsync.tensors import dtype_from_name, dtype_name, sha256

PROBE_COLUMNS = 8
"""Columns read back per weight: each is a full output row's worth of the kernel's weight."""

INT4_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def probe_columns(seed: int, in_features: int) -> torch.Tensor:
    """The input columns probed in a weight with ``in_features`` inputs under ``seed``."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + in_features) % (1 << 62))
    k = min(PROBE_COLUMNS, in_features)
    return torch.randperm(in_features, generator=g)[:k].sort().values


def probe_view(t: torch.Tensor, seed: int) -> torch.Tensor:
    """The part of ``t`` that is digested: probed columns of a matrix, all of a vector."""
    if t.dim() < 2:
        return t
    return t[..., probe_columns(seed, t.shape[-1])]


def digest(t: torch.Tensor) -> str:
    """dtype, shape and the sha256 of the bytes: equal only for the same values stored alike."""
    return f"{t.dtype}{tuple(t.shape)}:{sha256(t)}"


def probe_digest(t: torch.Tensor, seed: int) -> str:
    return digest(probe_view(t, seed))


def logical_name(name: str) -> str | None:
    """The weight a checkpoint tensor belongs to: ``X.weight_packed`` -> ``X.weight``; the
    other int4 parts (scale, shape, zero point) have no weight of their own (None)."""
    base, _, leaf = name.rpartition(".")
    if leaf == "weight_packed":
        return f"{base}.weight"
    return None if leaf in INT4_PARTS else name


def int4_columns(
    parts: dict[str, torch.Tensor], cols_C: torch.Tensor, group_size: int, symmetric: bool
) -> torch.Tensor:
    """Dequantized columns ``cols_C`` of a pack-quantized weight, op for op as
    compressed-tensors dequantizes (``(q - zp).to(dtype) * scale``), without unpacking the rest."""
    packed_OP, scale_OG = parts["weight_packed"], parts["weight_scale"]
    in_features = int(parts["weight_shape"][-1])
    k = in_features if group_size in (-1, None) else group_size
    words, shifts = cols_C // 8, (cols_C % 8) * 4
    # index_select: a tenth of what advanced indexing costs for a few columns.
    codes_OC = (packed_OP.index_select(-1, words) >> shifts) & 0xF
    if symmetric:
        offset_OC = torch.full_like(codes_OC, 8)
    else:
        zp_QG = parts["weight_zero_point"]  # packed along the output dim
        out = codes_OC.shape[-2]
        rows = torch.arange(out)
        zp_OG = (zp_QG[..., rows // 8, :] >> ((rows % 8) * 4).unsqueeze(-1)) & 0xF
        offset_OC = zp_OG.index_select(-1, cols_C // k)
    q_OC = codes_OC.to(torch.int16) - offset_OC.to(torch.int16)
    return q_OC.to(scale_OG.dtype) * scale_OG.index_select(-1, cols_C // k)


# --- engines with several ranks ---------------------------------------------------------
# A TP>1 engine's ranks each hold a shard: a rank reports the probed part of its shard (the
# same columns the trainer digests) with where it sits in the whole, and the pieces of all
# ranks are put back together before digesting. A rank that covers a weight whole (a
# replicated norm, a TP=1 engine) reports only the digest: nothing else crosses the wire.
# Piece forms (JSON): {"digest"} whole; {"rows": [start, total], "tensor"} output rows
# [start, start + n) of ``total``; {"cols": [...], "of": total, "tensor"} the probed input
# columns of ``total`` that this rank holds (row-parallel layers).


def rows_piece(t: torch.Tensor, start: int, total: int) -> dict:
    """Rows ``[start, start + len(t))`` of a weight with ``total`` output rows (dim 0)."""
    if start == 0 and t.shape[0] == total:
        return {"digest": digest(t)}
    return {"rows": [start, total], "tensor": encode(t)}


def cols_piece(t: torch.Tensor, cols: list[int], total: int, seed: int) -> dict:
    """The probed input columns ``cols`` (global indices, ascending) of a weight with
    ``total`` inputs, as [..., out, len(cols)]."""
    if cols == probe_columns(seed, total).tolist():
        return {"digest": digest(t)}
    return {"cols": cols, "of": total, "tensor": encode(t)}


def assemble(answers: list[dict[str, dict]], seed: int) -> dict[str, str]:
    """``{name: probe digest}`` of the whole weights, from every rank's pieces. A weight the
    ranks disagree on, or whose shards do not tile it, gets a digest that matches nothing
    and says why."""
    by_name: dict[str, list[dict]] = {}
    for pieces in answers:
        for name, piece in pieces.items():
            by_name.setdefault(name, []).append(piece)
    return {name: _assemble_one(pieces, seed) for name, pieces in by_name.items()}


def _assemble_one(pieces: list[dict], seed: int) -> str:
    kinds = {next(k for k in ("digest", "rows", "cols") if k in p) for p in pieces}
    if len(kinds) > 1:
        return f"mismatch: ranks report {sorted(kinds)}"
    kind = kinds.pop()
    if kind == "digest":
        found = {p["digest"] for p in pieces}
        return found.pop() if len(found) == 1 else "mismatch: ranks disagree"
    if kind == "rows":
        return _tile_rows(pieces)
    return _tile_cols(pieces, seed)


def _tile_rows(pieces: list[dict]) -> str:
    at: dict[int, torch.Tensor] = {}
    totals = {p["rows"][1] for p in pieces}
    for p in pieces:
        start, t = p["rows"][0], decode(p["tensor"])
        # Ranks that replicate a shard (GQA with fewer KV heads than ranks) must agree.
        if start in at and not torch.equal(at[start], t):
            return "mismatch: ranks disagree on a replicated shard"
        at[start] = t
    parts, end = [], 0
    for start in sorted(at):
        if start != end:
            return f"mismatch: rows {end}..{start} held by no rank"
        parts.append(at[start])
        end += at[start].shape[0]
    if len(totals) != 1 or end != totals.pop():
        return "mismatch: shards do not cover the weight"
    return digest(torch.cat(parts))


def _tile_cols(pieces: list[dict], seed: int) -> str:
    totals = {p["of"] for p in pieces}
    if len(totals) != 1:
        return "mismatch: ranks disagree on the input size"
    by_col: dict[int, torch.Tensor] = {}
    for p in pieces:
        t = decode(p["tensor"])
        for i, col in enumerate(p["cols"]):
            by_col[col] = t[..., i]
    if sorted(by_col) != probe_columns(seed, totals.pop()).tolist():
        return "mismatch: probed columns held by no rank"
    return digest(torch.stack([by_col[c] for c in sorted(by_col)], dim=-1))


def encode(t: torch.Tensor) -> dict:
    """A tensor as JSON: dtype name, shape, base64 of its bytes."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "b64": b64encode(raw).decode()}


def decode(d: dict) -> torch.Tensor:
    dtype = dtype_from_name(d["dtype"])
    if dtype is None:
        raise ValueError(f"probe piece: unknown dtype {d['dtype']!r}")
    raw = bytearray(b64decode(d["b64"], validate=True))
    if not raw:  # torch.frombuffer refuses an empty buffer
        return torch.empty(d["shape"], dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(d["shape"])
