"""Code that runs inside vLLM's processes (API server, engine core, workers).

vLLM calls ``register`` from its ``vllm.general_plugins`` entry point in every process it
starts; it adds the ``weightsync`` backend to vLLM's weight-transfer factory so that
``--weight-transfer-config '{"backend": "weightsync"}'`` selects it. The backend module
itself (and with it torch.distributed and vLLM internals) is imported lazily by the factory.

``register`` also asks Linux for AMX permission in every vLLM process: on Sapphire Rapids and
later, kernels loaded from a warm torch inductor cache use AMX tiles without asking (a cold
compile asks implicitly), and the worker dies with SIGILL on its first forward.
"""

import contextlib

BACKEND_NAME = "weightsync"


def request_amx() -> bool:
    """``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` for this process, through
    torch; True when AMX may be used. A no-op (False) on CPUs without AMX."""
    try:
        import torch

        return bool(torch._C._cpu._init_amx())
    except (ImportError, AttributeError, RuntimeError):
        return False


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    request_amx()

    # vLLM may load general plugins more than once per process, and the factory refuses a
    # name it already holds (ValueError).
    with contextlib.suppress(ValueError):
        WeightTransferEngineFactory.register_engine(
            BACKEND_NAME, "weightsync.engines.vllm_plugin.backend", "WeightsyncTransferEngine"
        )
