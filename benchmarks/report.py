"""``benchmarks.sync_bench`` output: bench.json, bench.md (README table) and bench.png."""

from __future__ import annotations

import json
from pathlib import Path

from weightsync.config import MiB


def sync_rows(report: dict) -> list[dict]:
    return [r | {"model": m["model"]} for m in report["sync"] for r in m.get("rows", [])]


def write_all(report: dict, out_dir: str) -> dict[str, str]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["md"].write_text(markdown(report))
    plot(report, paths["png"])
    return {k: str(p) for k, p in paths.items()}


def markdown(report: dict) -> str:
    lines = [
        "### Full sync vs the raw transport moving the same bytes (medians)",
        "",
        "Receiver: " + _receivers(report),
        "",
        "| model | transport | dtype | bucket MiB | MiB sent | sync s | raw s | sync/raw "
        "| export s | int4 s | extra peak MiB | /2 buckets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sync_rows(report):
        st = r["stages_s"]
        lines.append(
            f"| {r['model']} | {r['transport']} ({r['raw_what']}) | "
            f"{'int4' if r['int4'] else 'bf16'} | {r['bucket_mib']} | {r['nbytes'] / MiB:.0f} | "
            f"{r['sync_s']:.3f} | {r['raw_s']:.3f} | {r['sync_s'] / r['raw_s']:.2f} | "
            f"{st['export_s']:.3f} | {st['quantize_s']:.3f} | "
            f"{r['extra_peak_bytes'] / MiB:.0f} | "
            f"{r['extra_peak_bytes'] / (2 * r['max_bucket_bytes']):.2f} |"
        )
    lines += [
        f"\n{m['model']}: not measured: {m['error'].splitlines()[-1]}"
        for m in report["sync"]
        if "error" in m
    ]
    lines += _vllm_md(report.get("vllm", {})) + _quant_md(report["quant"]) + _summary_md(report)
    return "\n".join(lines) + "\n"


def _receivers(report: dict) -> str:
    rows = sync_rows(report)
    names = sorted({r["receiver"] for r in rows})
    return "; ".join(names) or "none"


def _vllm_md(vllm: dict) -> list[str]:
    if "rows" not in vllm:
        return ["", f"vLLM engine run: {vllm.get('skipped') or vllm.get('error', 'not run')}"]
    lines = [
        "",
        f"### Engine pause window vs transfer: {vllm['receiver']}",
        "",
        "| dtype | transport | staged | MiB | pause s | total s | export s | int4 s | transfer s "
        "| engine load s | pause/transfer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in vllm["rows"]:
        if "error" in r:
            lines.append(f"| {'int4' if r['int4'] else 'bf16'} | error: {r['error'][:80]} |")
            continue
        m = r["median_s"]
        lines.append(
            f"| {'int4' if r['int4'] else 'bf16'} | {r['transport']} | "
            f"{'yes' if r.get('staged') else 'no'} | {r['nbytes'] / MiB:.0f} | "
            f"{m['pause_s']:.3f} | {m['total_s']:.3f} | {m['export_s']:.3f} | "
            f"{m['quantize_s']:.3f} | {m['transfer_s']:.3f} | {m['engine_load_s']:.3f} | "
            f"{m['pause_s'] / max(m['transfer_s'], 1e-9):.2f} |"
        )
    return lines


def _quant_md(quant: dict) -> list[str]:
    c = quant["cpu"]
    rates = ", ".join(f"{k} {v:.2f} GiB/s" for k, v in c["gib_per_s"].items())
    lines = [
        "",
        f"### int4 quantize+pack, bf16 {tuple(c['shape'])}",
        "",
        f"{rates}; ours/compressed-tensors {c['ours_over_compressed_tensors']:.1f}x, "
        f"ours/memcpy {c['ours_over_memcpy']:.0%}",
    ]
    if "cuda" in quant:
        g = quant["cuda"]
        lines.append(
            f"\n{g['device']}: triton {g['triton_gib_per_s']:.0f} GiB/s, "
            f"triton/d2d copy {g['triton_over_d2d_copy']:.0%}"
        )
    return lines


def _summary_md(report: dict) -> list[str]:
    s = report.get("summary", {})
    if not s:
        return []
    flat = {k: v for k, v in s.items() if isinstance(v, float)}
    flat |= {f"pause_over_raw_transfer {k}": v for k, v in s.get("pause_over_transfer", {}).items()}
    return ["", "### Goals", ""] + [f"- {k}: {v:.2f}" for k, v in flat.items()]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sync_rows(report)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (transport, int4), style in _series(rows).items():
        pts = sorted((r["nbytes"] / MiB, r["sync_s"], r["raw_s"]) for r in style)
        label = f"{transport} {'int4' if int4 else 'bf16'}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"sync {label}")
        ax1.plot([p[0] for p in pts], [p[2] for p in pts], "x--", label=f"raw {label}")
    ax1.set(xlabel="MiB sent", ylabel="seconds (median)", title="full sync vs raw transport")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    for mib in sorted({r["bucket_mib"] for r in rows}):
        pts = sorted(
            (r["nbytes"] / MiB, r["extra_peak_bytes"] / MiB) for r in rows if r["bucket_mib"] == mib
        )
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"bucket {mib} MiB")
        ax2.axhline(2.2 * mib, ls=":", lw=0.8)
    ax2.set(xlabel="MiB sent", ylabel="extra peak RSS MiB", title="trainer memory (goal: dotted)")
    ax2.set_xscale("log")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(rows: list[dict]) -> dict:
    # One line per (transport, dtype) at the middle bucket size, so sizes are comparable.
    mibs = sorted({r["bucket_mib"] for r in rows})
    mid = mibs[len(mibs) // 2] if mibs else 0
    out: dict = {}
    for r in rows:
        if r["bucket_mib"] == mid:
            out.setdefault((r["transport"], r["int4"]), []).append(r)
    return out


def save_rows(rows: list[dict], out_dir: str, name: str) -> Path:
    """A benchmark's medians as ``<out_dir>/<name>.json``."""
    path = Path(out_dir, f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, default=str))
    return path


def print_table(header: list[str], cells: list[list[str]]) -> None:
    """A markdown table (the README's), one row per list of formatted cells."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in cells:
        print("| " + " | ".join(row) + " |")
