"""The engine contract (pure, in-process): both adapters implement both planes in full, the
driver and the source rank call nothing else, and SyncConfig's values are the ones the
adapters use."""

from __future__ import annotations

import ast
import inspect
import pickle
from pathlib import Path

import pytest

import weightsync
from weightsync.config import SyncConfig
from weightsync.engines.base import ControlPlane, DataPlane, EngineFailed
from weightsync.engines.sglang import SGLangEngine
from weightsync.engines.spec import EngineSpec
from weightsync.engines.vllm import VllmEngine

PLANES = (ControlPlane, DataPlane)
ADAPTERS = (VllmEngine, SGLangEngine)
PACKAGE = Path(weightsync.__file__).parent


def _members(protocol: type) -> set[str]:
    return {n for n in vars(protocol) if not n.startswith("_")} | set(
        getattr(protocol, "__annotations__", {})
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("plane", PLANES)
def test_every_adapter_implements_every_method_of_both_planes(adapter, plane):
    for name in _members(plane) - {"name"}:
        mine = getattr(adapter, name, None)
        if name in getattr(plane, "__annotations__", {}):  # an attribute, not a method
            assert isinstance(mine, bool), f"{adapter.__name__} lacks {plane.__name__}.{name}"
            continue
        assert callable(mine), f"{adapter.__name__} lacks {plane.__name__}.{name}"
        want = inspect.signature(getattr(plane, name)).parameters
        have = inspect.signature(mine).parameters
        # Every protocol parameter is accepted under its own name (extras must be optional).
        assert list(want) == list(have)[: len(want)], f"{adapter.__name__}.{name}"
        extra = list(have.values())[len(want) :]
        assert all(p.default is not p.empty for p in extra), f"{adapter.__name__}.{name}"


def _engine_calls(path: Path, names: set[str]) -> set[str]:
    """Attributes used on variables holding an engine adapter in one module."""
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in names
    }


def test_the_driver_and_the_source_rank_call_nothing_outside_their_plane():
    control = _engine_calls(PACKAGE / "driver.py", {"e", "engine"})
    assert control and control <= _members(ControlPlane), control - _members(ControlPlane)
    data = _engine_calls(PACKAGE / "sender.py", {"e", "engine"}) | _engine_calls(
        PACKAGE / "worker.py", {"engine"}
    )
    assert data and data <= _members(DataPlane), data - _members(DataPlane)


def test_the_driver_drives_engines_through_the_control_plane_only():
    """At run time too: every call of an update, a failed update, verify, versions and
    close goes to a ControlPlane member (a strict stand-in refuses anything else)."""
    from tests.unit.test_driver_flow import ScriptedEngine, ScriptedTrainers, _sync

    class Strict:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            assert name in _members(ControlPlane), f"the driver called engine.{name}"
            return getattr(self._inner, name)

    class Reading(ScriptedEngine):
        def get_version(self):
            return "1"

    engines = [Reading("e0"), Reading("e1", fail={"end": OSError("x")})]
    ws = _sync(engines, ScriptedTrainers(), verify="sample")
    ws.engines = {label: Strict(e) for label, e in ws.engines.items()}
    with pytest.raises(weightsync.UpdateFailed):
        ws.update(1)
    engines[1].fail = {}
    ws._connected = True
    ws.update(2)
    assert ws.versions() == {"e0": "1", "e1": "1"}
    ws.engines = {}
    ws.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_sync_config_values_are_what_both_planes_use(kind):
    config = SyncConfig(
        step_timeout_s=7.0, flush_retries=2, flush_backoff_s=0.25, flush_backoff_max_s=0.4
    )
    spec = EngineSpec(kind=kind, url="http://127.0.0.1:9", name="e")
    ws = weightsync.WeightSync(_NoTrainers(), [spec], config)
    source_rank = spec.connect(config)  # what the worker's install builds on the source rank
    for engine in (ws.engines["e"], source_rank):
        c = engine.config
        assert (c.timeout_s, c.flush_retries, c.flush_backoff_s, c.flush_backoff_max_s) == (
            7.0,
            2,
            0.25,
            0.4,
        )
        engine.close()
    own = EngineSpec(kind=kind, url="http://127.0.0.1:9", timeout_s=3.0).connect(config)
    assert own.config.timeout_s == 3.0  # an engine's own deadline wins
    own.close()


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_refused_flush_is_retried_with_syncconfigs_backoff(kind, monkeypatch):
    import requests

    import weightsync.engines.http as http

    sleeps: list[float] = []
    monkeypatch.setattr(http.time, "sleep", sleeps.append)
    config = SyncConfig(flush_retries=3, flush_backoff_s=0.1, flush_backoff_max_s=0.25)
    engine = EngineSpec(kind=kind, url="http://127.0.0.1:9", name="e").connect(config)
    calls = []
    if kind == "vllm":
        engine._call = lambda *a, **kw: calls.append(a) or {"success": False}
    else:

        def refuse(*a, **kw):
            calls.append(a)
            r = requests.Response()
            r.status_code, r._content = 400, b'{"message": "busy"}'
            return r

        engine._request = refuse
    assert engine.flush_cache() is False
    assert len(calls) == 4 and sleeps == [0.1, 0.2, 0.25]
    engine.close()


def test_an_engine_failure_crosses_process_boundaries_with_its_names():
    from weightsync.driver import _failed_engines
    from weightsync.ray_group import RankFailed

    error = pickle.loads(pickle.dumps(EngineFailed(("a", "b"), "bucket 3: refused")))
    assert error.engines == ("a", "b") and str(error) == "bucket 3: refused"
    try:
        try:
            raise error
        except EngineFailed as e:
            raise RankFailed(0, "send", e) from e
    except RankFailed as wrapped:
        assert _failed_engines(wrapped) == {"a", "b"}
    # Text that merely mentions an engine blames nobody.
    assert _failed_engines(RuntimeError("engine 'a' is fine")) == set()


def test_the_public_api_is_importable_from_the_package():
    for name in ("WeightSync", "SyncConfig", "EngineSpec", "Int4Config", "UpdateFailed"):
        assert getattr(weightsync, name).__name__ == name


class _NoTrainers:
    def run_all(self, fn, *args, timeout_s):
        raise AssertionError("not expected")
