"""Fused int4 quantize + pack kernels: ``native`` (C, CPU) and ``triton_int4`` (Triton, CUDA).

Accelerators only: ``weightsync.quant.int4`` is the reference grid, validates the weight and
picks a kernel. Every kernel has the same two functions, and nothing here imports ``int4``:

  supports(w, k) -> bool          whether it runs this (already validated) weight, group size k
  pack_rows(w_RI, k, symmetric)   -> (packed bytes uint8 [R, I/2], scale [R, G] in w's dtype,
                                      zp uint8 [R, G] | None, bad: a group held NaN/Inf)

Shape legend: R rows (leading dims flattened), I in features, K = k group size, G = I / K.
"""
