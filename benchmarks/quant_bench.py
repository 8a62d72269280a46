"""int4 quantize+pack throughput vs compressed-tensors' compressor and a memcpy, side by side.

    python -m benchmarks.quant_bench            # CPU: our fused kernel, torch reference, CT
    python -m benchmarks.quant_bench --cuda     # + the Triton kernel vs a device-to-device copy

Prints medians (GiB/s of bf16 input) and the ratios the project tracks:
ours / compressed-tensors (goal >= 5x) and ours / memcpy (goal >= 25%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from weightsync.quant import int4, pack_int4

GROUP = 128


def median_s(fn, reps: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ct_compress(w: torch.Tensor, packed: dict) -> None:
    # Imported here: the GPU machine that runs --cuda has no compressed-tensors.
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    for e in range(w.shape[0]) if w.dim() == 3 else [None]:
        pick = (lambda t: t) if e is None else (lambda t, e=e: t[e])
        sd = {
            "weight": pick(w),
            "weight_scale": pick(packed["weight_scale"]),
            "weight_zero_point": torch.zeros_like(pick(packed["weight_scale"]), dtype=torch.int8),
        }
        PackedQuantizationCompressor.compress(sd, scheme)


def reference(w: torch.Tensor) -> None:
    codes, _, _ = int4.quantize(w, GROUP, True)
    int4.pack_nibbles(codes)


def bench_cpu(name: str, w: torch.Tensor, reps: int) -> dict:
    gib = w.numel() * w.element_size() / 2**30
    dst = torch.empty_like(w)
    packed = pack_int4(w, GROUP, True)
    r = {
        "ours": median_s(lambda: pack_int4(w, GROUP, True), reps),
        "torch reference": median_s(lambda: reference(w), max(1, reps // 2)),
        "compressed-tensors": median_s(lambda: ct_compress(w, packed), max(1, reps // 3)),
        "memcpy": median_s(lambda: dst.copy_(w), reps),
    }
    print(f"\n{name} bf16 {tuple(w.shape)} ({gib * 1024:.0f} MiB), group {GROUP}, symmetric")
    for k, s in r.items():
        print(f"  {k:20s} {s * 1e3:9.2f} ms  {gib / s:7.2f} GiB/s")
    print(
        f"  ours / compressed-tensors: {r['compressed-tensors'] / r['ours']:.1f}x   "
        f"ours / memcpy: {r['memcpy'] / r['ours']:.0%}   "
        f"ours / torch reference: {r['torch reference'] / r['ours']:.1f}x"
    )
    return r


def bench_cuda(name: str, w: torch.Tensor, reps: int) -> None:
    w = w.cuda()
    dst = torch.empty_like(w)
    gib = w.numel() * w.element_size() / 2**30
    sync = torch.cuda.synchronize
    ours = median_s(lambda: pack_int4(w, GROUP, True), reps, sync)
    ref = median_s(lambda: reference(w), reps, sync)
    copy = median_s(lambda: dst.copy_(w), reps, sync)
    print(
        f"\n{name} on {torch.cuda.get_device_name()}: triton {ours * 1e3:.3f} ms "
        f"({gib / ours:.0f} GiB/s read), torch reference {ref * 1e3:.3f} ms, "
        f"d2d copy {copy * 1e3:.3f} ms ({2 * gib / copy:.0f} GiB/s r+w)"
    )
    print(
        f"  triton / d2d copy time: {copy / ours:.0%}   triton / torch reference: {ref / ours:.1f}x"
    )


def _gib(w: torch.Tensor) -> float:
    return w.numel() * w.element_size() / 2**30


def cpu_section(w: torch.Tensor, reps: int) -> dict:
    """The sync bench's int4 section: ``bench_cpu`` as data (GiB/s, the tracked ratios)."""
    seconds = bench_cpu("linear", w, reps)
    gib = _gib(w)
    return {
        "shape": list(w.shape),
        "median_s": seconds,
        "gib_per_s": {k: gib / s for k, s in seconds.items()},
        "ours_over_compressed_tensors": seconds["compressed-tensors"] / seconds["ours"],
        "ours_over_memcpy": seconds["memcpy"] / seconds["ours"],
    }


def cuda_section(w: torch.Tensor, reps: int) -> dict:
    w = w.cuda()
    dst = torch.empty_like(w)
    sync = torch.cuda.synchronize
    ours = median_s(lambda: pack_int4(w, GROUP, True), reps, sync)
    ref = median_s(lambda: reference(w), reps, sync)
    copy = median_s(lambda: dst.copy_(w), reps, sync)
    return {
        "device": torch.cuda.get_device_name(),
        "shape": list(w.shape),
        "median_s": {"triton": ours, "torch reference": ref, "d2d copy": copy},
        "triton_gib_per_s": _gib(w) / ours,
        "triton_over_d2d_copy": copy / ours,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cuda", action="store_true", help="also benchmark the Triton kernel")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = {"linear": (4096, 4096), "experts": (64, 1536, 4096)}
    for name, shape in shapes.items():
        w = torch.randn(shape, dtype=torch.bfloat16)
        if not args.cuda:
            bench_cpu(name, w, args.reps if name == "linear" else 3)
        else:
            bench_cuda(name, w, args.reps)


if __name__ == "__main__":
    main()
