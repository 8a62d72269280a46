"""Proof that an engine computes with the trainer's weights: what ``verify`` compares.

An engine does not compute with the bytes it received but with whatever its post-processing
made of them (repacked for oneDNN, prepacked MoE experts, int4 repacked for the WNA16 kernel,
an LM head that aliases the embedding). So the engine reads its weights back *through its
kernels*: a linear layer fed one-hot rows e_j returns column j of the weight it multiplies
with, exactly (one product by 1.0, the rest by 0.0). Both sides then fingerprint the columns
they cover with a keyed linear hash, and the driver compares the fingerprints.

Levels (``SyncConfig.verify``):

- ``sample``: per weight and update, one random input column in each of ``strata_of`` equal
  column ranges, all rows. The ranges are aligned so that every int4 group holds a probed
  column, and so does every TP shard of a row-parallel layer (bf16: any TP size dividing
  ``STRATA`` and the width; int4: shards of whole groups, as int4 engines cut them). The seed
  is drawn by the driver after the bytes were loaded, so the engine cannot predict it.
- ``full``: every element of every weight, read through the kernels in column chunks.

The fingerprint of a weight ``w`` (viewed as 16-bit words, their signed values shifted to
``v`` in [1, 2^16], ``[rows, words]``) is, for two independent key pairs ``(a, b)`` drawn from
(seed, weight name)::

    H = sum_i a_i * ((sum_j v_ij * b_j) mod P) mod P

It is linear over elements, so each engine rank hashes the part it holds with the global
row/column keys and the driver adds the parts: any sharding, no tensor crosses the wire. Two
different weights collide with probability below 2^-21 + 2^-31 per key pair (2^-40 for the
pair): ``b < 2^21`` keeps each row sum exact in float64 (``v * b <= 2^37``, at most 2^16
words per chunk), and ``v >= 1`` makes a missing all-zero column count.

Legend: ``w_RC`` rows x columns of a weight (as read); ``v_RW`` its 16-bit words.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

VerifyLevel = Literal["off", "sample", "full"]
LEVELS = ("off", "sample", "full")
STRATA = 16
"""Probed columns per weight at least (sample): enough that every shard of a TP<=16 engine
holds one."""
DERIVED = "#"
"""``<weight>#<what>``: a copy the engine derives from ``<weight>`` (MLA's decode copies of
kv_b_proj), read back on its own and compared with ``<weight>``'s fingerprint."""
P = (1 << 31) - 1
_B_HIGH = 1 << 21
_CHUNK_WORDS = 1 << 16  # words of one row summed in float64 at once (exactness bound)
_KEYS = 2  # independent key pairs


@dataclass(frozen=True)
class Probe:
    """What one verify reads: the level, the update's secret seed and the int4 group size
    the sampled columns are stratified on (0: not int4)."""

    seed: int
    level: VerifyLevel = "sample"
    group: int = 0

    def __post_init__(self) -> None:
        if self.level not in ("sample", "full"):
            raise ValueError(f"Probe.level={self.level!r}: 'sample' or 'full'")
        if not (0 <= self.seed < 1 << 62 and 0 <= self.group < 1 << 20):
            raise ValueError(f"Probe(seed={self.seed}, group={self.group}): out of range")

    def query(self) -> str:
        return f"proof:{self.level}:{self.group}:{self.seed}"

    @classmethod
    def parse(cls, arg: str) -> Probe:
        """From ``query()``'s text after ``proof:`` (an engine's input: checked)."""
        level, _, rest = arg.partition(":")
        group, _, seed = rest.partition(":")
        if not (group.isdigit() and seed.isdigit() and len(seed) < 20):
            raise ValueError(f"probe {arg[:60]!r}: expected <level>:<group>:<seed>")
        return cls(seed=int(seed), level=level, group=int(group))  # type: ignore[arg-type]

    def columns(self, name: str, in_features: int) -> torch.Tensor | None:
        """The probed input columns of weight ``name`` (ascending), None for all."""
        if self.level == "full":
            return None
        strata = strata_of(in_features, self.group)
        bounds = [i * in_features // strata for i in range(strata + 1)]
        widths = torch.tensor([bounds[i + 1] - bounds[i] for i in range(strata)])
        # 64 random bits per stratum, reduced mod its width (bias below 2^-40).
        draw = hashlib.shake_256(f"{self.seed}\0{name}\0columns".encode()).digest(8 * strata)
        bits = torch.frombuffer(bytearray(draw), dtype=torch.int64) & ((1 << 62) - 1)
        return torch.tensor(bounds[:-1]) + bits % widths


def strata_of(in_features: int, group: int) -> int:
    """Equal column ranges holding one probed column each: one per int4 group, doubled until
    at least ``STRATA`` where the width allows (every group and every TP shard covered)."""
    strata = in_features // group if group and in_features % group == 0 else 1
    while strata < STRATA and in_features % (strata * 2) == 0:
        strata *= 2
    return min(max(strata, min(STRATA, in_features)), in_features)


def _mix(seed: int, name: str, tag: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@functools.lru_cache(maxsize=16)  # weights of one width, and chunks, share their keys
def _keys(seed: int, tag: str, n: int, high: int) -> torch.Tensor:
    # Keys need not differ between weights (each is compared on its own), only between
    # updates: sharing them per width saves drawing them for every weight.
    g = torch.Generator().manual_seed(_mix(seed, f"keys{n}", tag))
    return torch.randint(0, high, (n, _KEYS), generator=g, dtype=torch.int64)


def words_per(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    if size not in (2, 4, 8):
        raise ValueError(f"proof: cannot fingerprint {dtype} (16-bit words only)")
    return size // 2


@dataclass(frozen=True)
class Piece:
    """Elements of weight ``name`` as read: its rows ``[rows[0], rows[0] + R)`` of ``rows[1]``
    (or the global rows ``row_ids``), its columns ``cols_C`` (global) of ``in_features``."""

    w_RC: torch.Tensor
    name: str
    rows: tuple[int, int]
    cols_C: torch.Tensor
    in_features: int
    row_ids: torch.Tensor | None = None


def partial(
    w_RC: torch.Tensor,
    probe: Probe,
    name: str,
    rows: tuple[int, int],
    cols_C: torch.Tensor,
    in_features: int,
) -> dict:
    """The fingerprint part of one ``Piece``: ``{"n": elements, "h": [...], "d": dtype}``;
    parts add (``combine``)."""
    return partials([Piece(w_RC, name, rows, cols_C, in_features)], probe)[0]


@torch.inference_mode()  # many small ops: no autograd bookkeeping
def partials(pieces: list[Piece], probe: Probe) -> list[dict]:
    """``partial`` of each piece. Pieces of one shape, dtype and row range (a layer's q_proj
    in every layer) are hashed together, a few ops for the group instead of per weight."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(pieces):
        words_per(p.w_RC.dtype)
        rows = ("ids", i) if p.row_ids is not None else p.rows
        key = (_matrix(p.w_RC).shape, p.w_RC.dtype, p.w_RC.device, rows, p.in_features)
        groups.setdefault(key, []).append(i)
    out: list[dict] = [{}] * len(pieces)
    for members in groups.values():
        group = [pieces[i] for i in members]
        for i, h in zip(members, _hash(group, probe), strict=True):
            p = pieces[i]
            out[i] = {"n": int(p.w_RC.numel()), "h": h, "d": str(p.w_RC.dtype)}
    return out


def _matrix(w_RC: torch.Tensor) -> torch.Tensor:
    return w_RC.reshape(-1, w_RC.shape[-1]) if w_RC.dim() != 1 else w_RC.reshape(1, -1)


def _words(group: list[Piece]) -> torch.Tensor:
    """The group's elements as [pieces, rows, 16-bit words] on the host, -0.0 counted as
    +0.0: a GEMM fed one-hot rows returns +0.0 for a stored -0.0 (both sides count zeros
    alike)."""
    w_GRC = torch.stack([_matrix(p.w_RC.detach()) for p in group])
    if w_GRC.is_floating_point():
        w_GRC = w_GRC.masked_fill(w_GRC == 0, 0)
    return w_GRC.view(torch.int16).cpu()


def _hash(pieces: list[Piece], probe: Probe) -> list[list[int]]:
    """The hashes of pieces sharing a shape, dtype and rows (``_KEYS`` each)."""
    first = pieces[0]
    k = words_per(first.w_RC.dtype)
    b = _keys(probe.seed, "cols", first.in_features * k, _B_HIGH)
    idx_GW = torch.stack([p.cols_C.to(torch.int64).cpu() for p in pieces])
    idx_GW = (idx_GW[:, :, None] * k + torch.arange(k)).reshape(len(pieces), -1)
    b_GWK = b[idx_GW].to(torch.float64)
    v_GRW = _words(pieces)
    sums_GRK = torch.zeros(*v_GRW.shape[:2], _KEYS, dtype=torch.int64)
    for s in range(0, v_GRW.shape[2], _CHUNK_WORDS):
        b_chunk = b_GWK[:, s : s + _CHUNK_WORDS]
        part = torch.bmm(v_GRW[:, :, s : s + _CHUNK_WORDS].to(torch.float64), b_chunk)
        # The word's signed value mapped to [1, 2^16] (never 0: a missing zero column
        # counts), folded out of the product so the words are converted once.
        part += 32769.0 * b_chunk.sum(1, keepdim=True)
        sums_GRK = (sums_GRK + part.to(torch.int64)) % P
    a_all = _keys(probe.seed, "rows", first.rows[1], P)
    if first.row_ids is not None:
        a_RK = a_all[first.row_ids.to(torch.int64).cpu()]
    else:
        a_RK = a_all[first.rows[0] : first.rows[0] + v_GRW.shape[1]]
    return (((sums_GRK * a_RK) % P).sum(1) % P).tolist()


def source_of(name: str) -> str:
    """The weight a derived copy's fingerprint must equal (itself for any other name)."""
    return name.partition(DERIVED)[0]


def combine(parts: list[dict]) -> dict:
    """The fingerprint of the union of disjoint parts (all of one dtype)."""
    dtypes = {p["d"] for p in parts}
    h = [sum(p["h"][i] for p in parts) % P for i in range(_KEYS)]
    return {"n": sum(p["n"] for p in parts), "h": h, "d": "|".join(sorted(dtypes))}


def text(fp: dict) -> str:
    """A fingerprint as the string the driver compares: dtype, elements covered, hashes."""
    return f"{fp['d']}:{fp['n']}:" + ".".join(f"{x:08x}" for x in fp["h"])


def fingerprint(w: torch.Tensor, probe: Probe, name: str) -> str:
    """The whole weight ``w`` as the trainer sent it ([..., out, in] or a vector)."""
    return fingerprint_columns(*probed(w, probe, name), probe, name)


def probed(
    w: torch.Tensor | dict[str, torch.Tensor],
    probe: Probe,
    name: str,
    group_size: int = 128,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What is fingerprinted of weight ``name``: its probed columns (a small copy; ``full``:
    the weight itself), which columns, and its width. A pack-quantized weight, given as its
    parts by leaf name (``weight_packed``, ``weight_scale``...), is dequantized on exactly those
    columns from the packed bytes, as the engine's kernel dequantizes them."""
    from weightsync.probe import int4_columns

    if isinstance(w, dict):
        in_features = int(w["weight_shape"][-1])
        cols = probe.columns(name, in_features)
        cols = torch.arange(in_features) if cols is None else cols
        return int4_columns(w, cols, group_size, symmetric), cols, in_features
    if w.dim() < 2:
        return w.reshape(1, -1), torch.arange(w.numel()), w.numel()
    cols = probe.columns(name, w.shape[-1])
    if cols is None:
        return w, torch.arange(w.shape[-1]), w.shape[-1]
    # index_select: a tenth of what advanced indexing costs for a few columns.
    return w.index_select(-1, cols), cols, w.shape[-1]


def fingerprint_columns(
    w_RC: torch.Tensor, cols_C: torch.Tensor, in_features: int, probe: Probe, name: str
) -> str:
    """A weight's probed columns ``cols_C`` of ``in_features``, already taken (``w_RC``)."""
    return fingerprints([(name, w_RC, cols_C, in_features)], probe)[name]


def fingerprints(
    taken: list[tuple[str, torch.Tensor, torch.Tensor, int]], probe: Probe
) -> dict[str, str]:
    """``fingerprint_columns`` of many weights ``(name, w_RC, cols_C, in_features)`` at once:
    their pieces hashed in groups (``partials``), a few ops per group, not per weight."""
    pieces = []
    for name, w_RC, cols_C, in_features in taken:
        w_RC = w_RC.reshape(-1, w_RC.shape[-1])
        step = max(1, (1 << 22) // max(1, len(cols_C)))  # bounded float64 copies
        rows = w_RC.shape[0]
        pieces += [
            Piece(w_RC[s : s + step], name, (s, rows), cols_C, in_features)
            for s in range(0, rows, step)
        ]
    by_name: dict[str, list[dict]] = {}
    for piece, part in zip(pieces, partials(pieces, probe), strict=True):
        by_name.setdefault(piece.name, []).append(part)
    return {name: text(combine(parts)) for name, parts in by_name.items()}


# --- engines with several ranks ---------------------------------------------------------
# Each rank reports, per weight, its parts keyed by where they sit ("r<start>+<n>" output
# rows, "c<start>+<n>" a range of input columns, "all"). Ranks that replicate a part (KV heads
# on more ranks than there are heads) report the same key and must agree; the driver
# combines one part per key.


def assemble(answers: list[dict[str, dict[str, dict]]]) -> dict[str, str]:
    """``{name: fingerprint text}`` of the whole weights from every rank's keyed parts; a
    weight whose replicas disagree gets a text that matches nothing and says why."""
    by_name: dict[str, dict[str, list[dict]]] = {}
    for parts in answers:
        for name, keyed in parts.items():
            for key, part in keyed.items():
                by_name.setdefault(name, {}).setdefault(key, []).append(part)
    out = {}
    for name, keyed in by_name.items():
        if any(any(p != ps[0] for p in ps) for ps in keyed.values()):
            out[name] = "mismatch: ranks disagree on a replicated shard"
        else:
            out[name] = text(combine([ps[0] for ps in keyed.values()]))
    return out


def checkpoint_fingerprints(
    named: dict[str, torch.Tensor], probe: Probe, group_size: int = 128, symmetric: bool = True
) -> dict[str, str]:
    """The fingerprints an engine holding exactly the checkpoint tensors ``named`` reads
    back, by weight name: int4 weights dequantized from their parts (``group_size`` and
    ``symmetric`` as packed), every other tensor as it is."""
    from weightsync.probe import INT4_PARTS, logical_name

    out = {}
    for name, t in named.items():
        logical = logical_name(name)
        if logical == name:
            out[name] = fingerprint(t, probe, name)
        elif logical is not None:
            base = name.rpartition(".")[0]
            parts = {p: named[f"{base}.{p}"] for p in INT4_PARTS if f"{base}.{p}" in named}
            taken = probed(parts, probe, logical, group_size, symmetric)
            out[logical] = fingerprint_columns(*taken, probe, logical)
    return out
