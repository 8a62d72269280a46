"""verify's expected fingerprints from trainer slices: the proof of a sharded sync, where no
rank holds a whole tensor.

``weightsync.proof``'s fingerprint is linear over elements with global row and column keys,
so a slice's part, hashed where it lies, adds up with the other slices' parts to the whole
tensor's fingerprint (``proof.combine``). A trainer rank hashes the slices it is the first
holder of (each slice once, whichever replicas hold it); the parts of all ranks combine into
the fingerprints ``proof.checkpoint_fingerprints`` gives for the whole tensors, int4 included
(a slice quantized on its own is exactly the whole's slice: ``weightsync.quant.shards``).
"""

from __future__ import annotations

import torch

from megatron_bridge.meta import Box
from weightsync import proof
from weightsync.probe import int4_columns
from weightsync.quant.config import Int4Config
from weightsync.quant.stream import quantize_named

_ROWS = 1 << 22  # elements hashed at once (bounded float64 copies, as proof.fingerprints)


def slice_part(
    name: str,
    piece: torch.Tensor,
    box: Box,
    shape: tuple[int, ...],
    probe: proof.Probe,
    int4: Int4Config | None = None,
) -> dict:
    """The fingerprint part of ``piece`` (``box`` of HF tensor ``name`` of ``shape``)."""
    if len(shape) < 2:
        (c0, c1), n = box[0], shape[0]
        return proof.partial(piece.reshape(1, -1), probe, name, (0, 1), torch.arange(c0, c1), n)
    (r0, r1), (c0, c1) = box
    in_features = shape[-1]
    cols = probe.columns(name, in_features)
    cols = torch.arange(c0, c1) if cols is None else cols[(cols >= c0) & (cols < c1)]
    local = cols - c0
    if int4 is not None and int4.is_quantized(name, shape):
        parts = {n.rpartition(".")[2]: t for n, t in quantize_named(name, piece, int4)}
        w_RC = int4_columns(parts, local, int4.group_size, int4.symmetric)
    else:
        w_RC = piece.index_select(-1, local)
    step = max(1, _ROWS // max(1, len(cols)))
    chunks = [
        proof.Piece(w_RC[s : s + step], name, (r0 + s, shape[0]), cols, in_features)
        for s in range(0, r1 - r0, step)
    ]
    assert chunks, (name, box)
    return proof.combine(proof.partials(chunks, probe))


def expected(parts: list[dict[str, list[dict]]]) -> dict[str, str]:
    """Fingerprint texts of whole tensors from every rank's ``{name: [parts]}``."""
    by_name: dict[str, list[dict]] = {}
    for rank_parts in parts:
        for name, ps in rank_parts.items():
            by_name.setdefault(name, []).extend(ps)
    return {name: proof.text(proof.combine(ps)) for name, ps in by_name.items()}
