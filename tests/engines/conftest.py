"""Fixtures the engine test modules share."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def sglang_structs():
    """SGLang request bodies are built from SGLang's own io_struct (which needs the torchvision
    stub on CPU); the adapter's cached view of it is rebuilt around each module."""
    from tests.sglang_protocol_server import import_io_struct
    from weightsync.engines.sglang_payloads import io_structs

    import_io_struct()
    io_structs.cache_clear()
    assert io_structs() is not None
    yield
    io_structs.cache_clear()
