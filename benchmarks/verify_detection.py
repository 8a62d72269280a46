"""How often ``verify`` catches a fault in a weight, measured beside what its formula says.

Each trial draws a fresh probe seed (as the driver does per update) and a fresh fault, then
fingerprints the true weight as the trainer does and the faulty one as an engine reads it
(int4: its dequantized values; a stale TP shard: the two ranks' parts, assembled). A trial
detects the fault when the two texts differ. The formula is the chance that a probed column
holds a changed element (one column per stratum at ``sample``, all at ``full``), averaged
over the trials; the hash itself misses with probability below 2^-40.

    .venv/bin/python -m benchmarks.verify_detection [--trials N] [--precision 0.01] [--out DIR]

Pure torch on the CPU, one thread. By default each cell runs batches until its 95% (Wilson)
interval is within +-1% and holds at least 20 detections (or no miss): at least 1000 trials
at ``sample`` and 300 at ``full`` (all 300 detected: the miss rate is below 1.3%), about 5000
where the rate is near 85% or near 1/256.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsync.probe import int4_columns
from weightsync.proof import Probe, assemble, fingerprint, fingerprint_columns, partial, strata_of
from weightsync.quant import Int4Config, quantize_named, unpack_int4
from weightsync.quant.int4 import unpack_nibbles

NAME = "model.layers.0.mlp.down_proj.weight"
OUT = 512  # output rows: detection depends on the columns; fewer rows keep trials fast
ONE_COLUMN = {"sample": "1/stratum width", "full": "1"}
EVERY_STRATUM = {"sample": "1", "full": "1"}
_BITS = torch.tensor([1 << b for b in range(16)]).to(torch.int16)  # bit 15 wraps: 0x8000

Trial = Callable[[Probe, random.Random], tuple[bool, torch.Tensor]]
"""One fault, one probe: (detected, the columns the fault changed as a bool mask)."""


@dataclass
class Case:
    fault: str
    weight: str
    in_features: int
    group: int
    run: Trial
    formula: dict[str, str]  # the formula per level, in words


def _weight(in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(OUT, in_features, generator=g) * 0.02).to(torch.bfloat16)


def _mask(in_features: int, cols) -> torch.Tensor:
    m = torch.zeros(in_features, dtype=torch.bool)
    m[cols] = True
    return m


def one_element(in_features: int) -> Case:
    w = _weight(in_features)
    words = w.view(torch.int16)

    def run(probe: Probe, rng: random.Random):
        r, c, bit = rng.randrange(OUT), rng.randrange(in_features), rng.randrange(16)
        true = fingerprint(w, probe, NAME)
        old = words[r, c].clone()
        words[r, c] ^= _BITS[bit]  # one bit of one element flipped
        served = fingerprint(w, probe, NAME)
        words[r, c] = old
        return served != true, _mask(in_features, [c])

    return Case(
        "one wrong element (1 bit)", f"bf16 {OUT}x{in_features}", in_features, 0, run, ONE_COLUMN
    )


def one_row(in_features: int) -> Case:
    w = _weight(in_features)

    def run(probe: Probe, rng: random.Random):
        r = rng.randrange(OUT)
        true = fingerprint(w, probe, NAME)
        old = w[r].clone()
        w[r] += 1  # every element of the row changes (|w| << 1)
        served = fingerprint(w, probe, NAME)
        w[r] = old
        return served != true, _mask(in_features, slice(None))

    return Case("one wrong row", f"bf16 {OUT}x{in_features}", in_features, 0, run, EVERY_STRATUM)


def stale_shard(in_features: int) -> Case:
    """Rank 1 of a TP=2 row-parallel layer still holds the previous update's columns."""
    old = _weight(in_features)
    noise = torch.randn(OUT, in_features, generator=torch.Generator().manual_seed(1)) * 2e-3
    new = (old.float() + noise).to(torch.bfloat16)
    half = in_features // 2
    changed = (new != old).any(0)
    assert bool(changed[half:].all()), "every stale column must differ"

    def run(probe: Probe, rng: random.Random):
        cols = probe.columns(NAME, in_features)
        cols = torch.arange(in_features) if cols is None else cols
        answers = []
        for rank, held in enumerate((new, old)):
            mine = cols[(cols >= rank * half) & (cols < (rank + 1) * half)]
            part = partial(held[:, mine], probe, NAME, (0, OUT), mine, in_features)
            answers.append({NAME: {f"c{rank * half}+{half}": part}})
        served = assemble(answers)[NAME]
        return served != fingerprint(new, probe, NAME), _mask(in_features, slice(half, None))

    return Case(
        "stale TP shard (rank 1 of 2)",
        f"bf16 {OUT}x{in_features}",
        in_features,
        0,
        run,
        EVERY_STRATUM,
    )


def _int4(in_features: int, group: int):
    """A packed int4 weight and its two readers: the trainer's fingerprint of what it sent
    (dequantized probed columns, as the sender takes them) and the engine's (the weight its
    kernel dequantizes: whole at ``full``, the probed columns at ``sample``)."""
    w = _weight(in_features)
    named = quantize_named(NAME, w, Int4Config(group_size=group))
    parts = {n.rpartition(".")[2]: t for n, t in named}
    codes = unpack_nibbles(parts["weight_packed"]).view(OUT, in_features)
    every = torch.arange(in_features)
    sent_all = int4_columns(parts, every, group, True)  # the trainer's bytes never change

    def sent(probe: Probe) -> str:
        cols = probe.columns(NAME, in_features)
        if cols is None:
            return fingerprint_columns(sent_all, every, in_features, probe, NAME)
        w_OC = int4_columns(parts, cols, group, True)
        return fingerprint_columns(w_OC, cols, in_features, probe, NAME)

    def served(probe: Probe) -> str:
        cols = probe.columns(NAME, in_features)
        if cols is None:
            return fingerprint(unpack_int4(parts, group, True), probe, NAME)
        w_OC = int4_columns(parts, cols, group, True)
        return fingerprint_columns(w_OC, cols, in_features, probe, NAME)

    return parts, codes, sent, served


def int4_scale(in_features: int, group: int) -> Case:
    parts, codes, sent, served = _int4(in_features, group)
    scale = parts["weight_scale"]

    def run(probe: Probe, rng: random.Random):
        r, grp = rng.randrange(OUT), rng.randrange(in_features // group)
        true = sent(probe)
        old = scale[r, grp].clone()
        scale[r, grp] = old * 2  # every nonzero dequantized element of the group changes
        hit = served(probe) != true
        scale[r, grp] = old
        span = slice(grp * group, (grp + 1) * group)
        changed = torch.zeros(in_features, dtype=torch.bool)
        changed[span] = codes[r, span] != 8  # symmetric: code 8 is 0 whatever the scale
        return hit, changed

    return Case(
        "one wrong int4 scale (x2)",
        f"int4 g{group} {OUT}x{in_features}",
        in_features,
        group,
        run,
        {"sample": "1 - zero codes", "full": "1 - [all zero]"},
    )


def int4_nibble(in_features: int, group: int) -> Case:
    parts, _, sent, served = _int4(in_features, group)
    packed = parts["weight_packed"]

    def run(probe: Probe, rng: random.Random):
        r, j, k = rng.randrange(OUT), rng.randrange(in_features // 8), rng.randrange(8)
        flip = rng.randrange(1, 16) << (4 * k)
        true = sent(probe)
        old = packed[r, j].clone()
        packed[r, j] ^= flip - (1 << 32) if flip >= 1 << 31 else flip  # as int32
        hit = served(probe) != true
        packed[r, j] = old
        return hit, _mask(in_features, [8 * j + k])

    return Case(
        "one wrong int4 code (nibble)",
        f"int4 g{group} {OUT}x{in_features}",
        in_features,
        group,
        run,
        ONE_COLUMN,
    )


def expected(changed: torch.Tensor, probe: Probe) -> float:
    """The chance that a probed column holds a change: at ``sample`` one column per stratum,
    uniform in it, so 1 - prod over strata of (unchanged share of the stratum)."""
    if probe.level == "full":
        return float(changed.any())
    n = len(changed)
    strata = strata_of(n, probe.group)
    bounds = torch.arange(strata + 1) * n // strata
    seen = torch.cat([torch.zeros(1), changed.cumsum(0, dtype=torch.float64)])
    share = (seen[bounds[1:]] - seen[bounds[:-1]]) / (bounds[1:] - bounds[:-1])
    return 1 - float((1 - share).prod())


MIN_TRIALS = {"sample": 1000, "full": 300}  # multiples of BATCH
MAX_TRIALS = 20_000
BATCH = 100


def measure(
    case: Case, level: str, trials: int | None, precision: float, rng: random.Random
) -> dict:
    """Detections over ``trials`` faults, or (None) over batches until the 95% interval is
    within +-``precision`` and holds 20 detections or no miss (a small rate measured, not
    only bounded)."""
    detected, formula, done = 0, 0.0, 0
    while done < (trials or MAX_TRIALS):
        probe = Probe(seed=rng.getrandbits(62), level=level, group=case.group)  # per update
        hit, changed = case.run(probe, rng)
        detected, formula, done = detected + hit, formula + expected(changed, probe), done + 1
        if trials is None and done >= MIN_TRIALS[level] and done % BATCH == 0:
            lo, hi = wilson(detected, done)
            if (hi - lo) / 2 <= precision and (detected >= 20 or detected == done):
                break
    trials = done
    lo, hi = wilson(detected, trials)
    return {
        "fault": case.fault,
        "weight": case.weight,
        "level": level,
        "trials": trials,
        "detected": detected,
        "rate": detected / trials,
        "ci95": [lo, hi],
        "formula": case.formula[level],
        "formula_value": formula / trials,
        "strata": strata_of(case.in_features, case.group) if level == "sample" else None,
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p, d = k / n, 1 + z * z / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (mid - half) / d), min(1.0, (mid + half) / d)


def cost(repeats: int = 5) -> dict:
    """Seconds to fingerprint one 4096x4096 bf16 weight, as the trainer does (median)."""
    w = _weight(4096).repeat(8, 1)
    out = {}
    for level in ("sample", "full"):
        times = []
        for seed in range(repeats):
            t0 = time.perf_counter()
            fingerprint(w, Probe(seed=seed, level=level), NAME)
            times.append(time.perf_counter() - t0)
        out[level] = statistics.median(times)
    return out


def cases() -> list[Case]:
    return [
        one_element(4096),
        one_element(1024),
        int4_nibble(4096, 128),
        int4_nibble(4096, 32),
        one_row(4096),
        one_row(1024),
        stale_shard(4096),
        stale_shard(1024),
        int4_scale(4096, 128),
        int4_scale(4096, 32),
    ]


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| fault | weight | level | strata | trials | detected | rate [95% CI] | formula |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['fault']} | {r['weight']} | {r['level']} | {r['strata'] or 'all'} "
            f"| {r['trials']} | {r['detected']} "
            f"| {100 * r['rate']:.2f}% [{100 * lo:.2f}, {100 * hi:.2f}] "
            f"| {r['formula']} = {100 * r['formula_value']:.2f}% |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", type=int, default=None, help="per fault and level (default: adaptive)"
    )
    parser.add_argument("--precision", type=float, default=0.01, help="95%% half-width")
    parser.add_argument("--seed", type=int, default=0, help="the faults' and probes' draws")
    parser.add_argument("--out", default=None, help="folder for verify_detection.json")
    args = parser.parse_args()
    if (args.trials is not None and args.trials < 1) or not 0 < args.precision < 1:
        raise ValueError(f"--trials={args.trials} (>= 1), --precision={args.precision} (0..1)")
    torch.set_num_threads(1)  # light: engines may share the box
    rng, t0 = random.Random(args.seed), time.perf_counter()
    rows = []
    for case in cases():
        for level in ("sample", "full"):
            rows.append(measure(case, level, args.trials, args.precision, rng))
            r = rows[-1]
            print(f"  {case.fault}, {case.weight}, {level}: {r['detected']}/{r['trials']}")
    spent = cost()
    lines = table(rows)
    lines += [
        "",
        "| fingerprint, one 4096x4096 bf16 weight | sample | full |",
        "|---|---|---|",
        f"| median of 5, 1 CPU thread | {1e3 * spent['sample']:.2f} ms "
        f"| {1e3 * spent['full']:.0f} ms |",
    ]
    print(f"\n({time.perf_counter() - t0:.0f} s)\n")
    print("\n".join(lines))
    if args.out:
        path = Path(args.out) / "verify_detection.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "fingerprint_s": spent}, indent=1) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
