"""Code that runs inside vLLM's processes (API server, engine core, workers).

vLLM calls ``register`` from its ``vllm.general_plugins`` entry point in every process it
starts; it adds the ``weightsync`` backend to vLLM's weight-transfer factory so that
``--weight-transfer-config '{"backend": "weightsync"}'`` selects it. The backend module
itself (and with it torch.distributed and vLLM internals) is imported lazily by the factory.
"""

import contextlib

BACKEND_NAME = "weightsync"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    # vLLM may load general plugins more than once per process, and the factory refuses a
    # name it already holds (ValueError).
    with contextlib.suppress(ValueError):
        WeightTransferEngineFactory.register_engine(
            BACKEND_NAME, "weightsync.engines.vllm_plugin.backend", "WeightsyncTransferEngine"
        )
