"""The one place that lets megatron-core 0.16.1 run on CPU with gloo.

megatron-core assumes CUDA in a handful of spots that are not about compute at all: its RNG
tracker saves/restores *CUDA* generator states, a few modules move small tensors to
``torch.cuda.current_device()``, and the MoE alltoall dispatcher creates a side stream for
device-to-host copies. ``enable_cpu_megatron()`` redirects exactly those spots to the CPU.
Nothing here runs at import time; call it once per process before building a model, and never
on a machine with CUDA (it refuses, so a GPU run cannot silently lose its CUDA RNG streams).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator

import torch

_ENABLED = False


class _NoStream:
    """Stands in for ``torch.cuda.Stream``: on CPU every copy is already synchronous."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self) -> _NoStream:
        return self  # an "event" only needs synchronize()

    def __eq__(self, other: object) -> bool:
        # The dispatcher asks "am I on the side stream?"; on CPU there is only one stream.
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0


@contextlib.contextmanager
def _no_stream_ctx(stream: object = None) -> Iterator[None]:
    yield


def _patch_rng() -> None:
    # The tracker forks named RNG streams (tensor-parallel init, expert init, dropout) by
    # saving/restoring "CUDA" states; the CPU default generator plays that role here.
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_moe() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.stream = _no_stream_ctx

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def to_host(tensor: torch.Tensor, as_numpy: bool = False, record_stream: bool = False):
        # gloo's all_to_all_single wants split sizes as a sequence, not a (CPU) tensor.
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def _patch_masks() -> None:
    # Without an explicit attention mask the softmax builds its causal mask on "cuda".
    from megatron.core.fusions import fused_softmax

    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    fused_softmax.get_default_causal_mask = causal_mask


def _patch_tied_embeddings() -> None:
    # With PP > 1 a tied output layer is synced from the embedding by an all-reduce on
    # ``weight.data.cuda()``; keep that one call on the CPU instead of patching Tensor.cuda
    # for the whole process.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup(self: LanguageModule) -> None:
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            original(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup


VERIFIED_MCORE = "0.16.1"


def _check_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != VERIFIED_MCORE:
        warnings.warn(
            f"megatron-core {package_info.__version__}: these patches were verified against "
            f"{VERIFIED_MCORE} only",
            stacklevel=3,
        )


def enable_megatron_without_te() -> None:
    """Work around two mcore 0.16.1 bugs that hit any run without TransformerEngine (GPU too).

    Idempotent; a no-op when TransformerEngine is installed. ``enable_cpu_megatron`` calls it.
    """
    _check_version()
    if importlib.util.find_spec("transformer_engine") is not None:
        return
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    # The router references te_general_gemm, which is only defined when TE imports.
    moe_utils.te_general_gemm = None
    # MLA imports TE names that resolve to MagicMock stubs and then believes TE is present
    # (HAVE_TE=True), so its isinstance(x, TELinear) check fails.
    if not isinstance(mla.TELinear, type):
        mla.HAVE_TE = False


def enable_cpu_megatron() -> None:
    """Make megatron-core usable on CPU (idempotent). Raises if CUDA is available."""
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("enable_cpu_megatron() is for CPU-only hosts; CUDA is available here")
    _patch_rng()
    torch.cuda.current_device = lambda: "cpu"
    _patch_masks()
    _patch_tied_embeddings()
    enable_megatron_without_te()
    _patch_moe()
    _ENABLED = True


def cpu_megatron_enabled() -> bool:
    return _ENABLED
