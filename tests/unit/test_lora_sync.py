"""Adapter-only sync, pure: its settings, the adapter directory the engines load, which
versions stay, and the driver's flow with scripted engines (nothing paused, all or none)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_driver_flow import ScriptedEngine, ScriptedTrainers, _sync
from weightsync.config import LoraSync
from weightsync.driver import UpdateFailed
from weightsync.lora import ADAPTER_FILE, CONFIG_FILE, adapter_digests, prune, write_adapter
from weightsync.probe import probe_digest
from weightsync.worker import TrainerSync


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"name": "a/b"}, "LoraSync.name"),
        ({"name": ".hidden"}, "LoraSync.name"),
        ({"root": "relative/dir"}, "LoraSync.root"),
        ({"keep": 0}, "LoraSync.keep"),
        ({"keep": True}, "LoraSync.keep"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        LoraSync(**fields)


def test_the_adapter_is_written_whole_and_a_rewrite_replaces_it(tmp_path):
    path = tmp_path / "policy@v1"
    a = {"x.lora_A.weight": torch.randn(4, 8).t()}  # not contiguous: written all the same
    assert write_adapter(path, a, {"r": 4}) == 4 * 8 * 4
    assert torch.equal(load_file(path / ADAPTER_FILE)["x.lora_A.weight"], a["x.lora_A.weight"])
    assert json.loads((path / CONFIG_FILE).read_text()) == {"r": 4}
    b = {"x.lora_A.weight": torch.zeros(2, 2)}
    write_adapter(path, b, {"r": 2})
    assert load_file(path / ADAPTER_FILE)["x.lora_A.weight"].shape == (2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy@v1"]  # no temp left


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error type
        write_adapter(tmp_path / "policy@v1", {"x": "not a tensor"}, {})
    assert list(tmp_path.iterdir()) == []


def test_prune_keeps_the_loaded_versions_of_one_adapter_only(tmp_path):
    for name in ["policy@v2", "policy@v10", "policy@v9", "other@v1", "policy@v11"]:
        (tmp_path / name).mkdir()  # v11: a failed load; v2: retired
    assert prune(tmp_path, "policy", {"policy@v9", "policy@v10"}) == ["policy@v11", "policy@v2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other@v1", "policy@v10", "policy@v9"]


class AdapterEngine(ScriptedEngine):
    def __init__(self, name: str, fail: dict | None = None) -> None:
        super().__init__(name, fail)
        self.adapters: set[str] = set()
        self.slot = dict(SENT)  # what its LoRA kernels read back for any adapter

    def adapter_digests(self, name: str, seed: int) -> dict[str, str]:
        self._step("readback")
        assert name in self.adapters
        return self.slot

    def load_adapter(self, name: str, path: str) -> None:
        self._step("load")
        self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        self._step("unload")
        self.adapters.discard(name)


SENT = {"m.q_proj.lora_A.weight": "dA", "m.q_proj.lora_B.weight": "dB"}


class AdapterTrainers(ScriptedTrainers):
    """The source rank's publish_adapter: engines in ``memory`` took the adapter from it
    (the ones in ``refused`` failed to), the others get its path."""

    def __init__(self, memory: dict[str, AdapterEngine] | None = None, refused=()) -> None:
        super().__init__()
        self.memory, self.refused = memory or {}, set(refused)
        self.after: Exception | None = None  # raised once the in-memory engines took it

    def run_all(self, fn, *args, timeout_s):
        if fn is TrainerSync.publish_adapter:
            lora, version, live, seed = args[1], args[2], args[3], args[5]
            served = lora.served_name(version)
            taken = {lb: e for lb, e in self.memory.items() if lb in live}
            for label, engine in taken.items():
                if label not in self.refused:
                    engine.adapters.add(served)
            if self.after is not None:
                raise self.after
            out = {
                "path": str(lora.path("id", served)) if set(live) - set(taken) else None,
                "in_memory": sorted(taken),
                "errors": {lb: f"engine {lb!r}: checksum mismatch" for lb in self.refused},
                "nbytes": 8,
                "export_s": 0.0,
                "write_s": 0.0,
                "digests": SENT if seed is not None else {},
            }
            return [out, None]
        return super().run_all(fn, *args, timeout_s=timeout_s)


def _adapter_sync(engines, keep: int = 2, verify: str = "off"):
    lora = LoraSync(root="/nonexistent", keep=keep)
    return _sync(engines, AdapterTrainers(), lora=lora, verify=verify)


def test_adapter_updates_pause_nothing_and_keep_the_last_versions():
    engines = [AdapterEngine("e0"), AdapterEngine("e1")]
    ws = _adapter_sync(engines)
    for version in (1, 2, 3):
        stats = ws.update_adapter(version)
    assert ws.adapter == stats.adapter == "policy@v3" and stats.unloaded == ["policy@v1"]
    for e in engines:
        assert e.adapters == {"policy@v2", "policy@v3"}
        assert set(e.calls) == {"load", "unload"}  # never paused, flushed or versioned


def test_an_engine_that_cannot_load_means_no_engine_switches():
    good, bad = AdapterEngine("good"), AdapterEngine("bad")
    ws = _adapter_sync([good, bad])
    ws.update_adapter(1)
    bad.fail = {"load": RuntimeError("HTTP 400: rank too high")}
    with pytest.raises(UpdateFailed, match=r"policy@v2.*rank too high") as info:
        ws.update_adapter(2)
    assert info.value.stale == [] and not ws.stale  # the base is untouched
    assert ws.adapter == "policy@v1"
    assert good.adapters == {"policy@v1"} and bad.adapters == {"policy@v1"}


def test_a_base_update_retires_every_adapter_and_adapters_need_lora_set():
    engine = AdapterEngine("e0")
    ws = _adapter_sync([engine])
    ws.update_adapter(1)
    ws.update(2)
    assert ws.adapter is None and engine.adapters == set()
    plain = _sync([AdapterEngine("e1")], AdapterTrainers())
    with pytest.raises(ValueError, match=r"SyncConfig\.lora"):
        plain.update_adapter(1)


def test_a_failed_base_update_retires_adapters_and_adapters_need_a_live_engine():
    engine = AdapterEngine("e0")
    ws = _adapter_sync([engine])
    ws.update_adapter(1)
    engine.fail = {"end": RuntimeError("reload broke")}
    with pytest.raises(UpdateFailed):
        ws.update(2)  # the session opened: the base may have changed
    assert ws.adapter is None and engine.adapters == set() and ws.stale == {"e0"}
    engine.fail = {}
    with pytest.raises(UpdateFailed, match="no live engine"):
        ws.update_adapter(3)


def test_a_published_version_is_never_rewritten():
    ws = _adapter_sync([AdapterEngine("e0")])
    ws.update_adapter(1)
    with pytest.raises(ValueError, match="already published"):
        ws.update_adapter(1)
    with pytest.raises(ValueError, match="an int"):
        ws.update_adapter("2")


def test_the_launcher_serves_the_smallest_lora_rank_vllm_accepts(tmp_path):
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    (tmp_path / "config.json").write_text("{}")
    cfg = VllmServerConfig(model_dir=str(tmp_path), log_path=str(tmp_path / "log"), max_lora_rank=4)
    cmd = VllmServer(cfg).command()
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"
    with pytest.raises(ValueError, match="max_lora_rank"):
        VllmServerConfig(model_dir=str(tmp_path), log_path="x", max_lora_rank=1024)


def test_verify_reads_every_engine_slot_and_a_wrong_one_means_no_engine_switches():
    good, bad = AdapterEngine("good"), AdapterEngine("bad")
    ws = _adapter_sync([good, bad], verify="sample")
    stats = ws.update_adapter(1)
    assert stats.verified and "readback" in good.calls and "readback" in bad.calls
    bad.slot = {**SENT, "m.q_proj.lora_B.weight": "stale"}
    with pytest.raises(UpdateFailed, match=r"policy@v2 failed verify.*bad.*lora_B"):
        ws.update_adapter(2)
    assert ws.adapter == "policy@v1" and not ws.stale
    assert good.adapters == {"policy@v1"} and bad.adapters == {"policy@v1"}
    bad.slot = {
        **SENT,
        "m.k_proj.lora_A.weight": "mismatch: slot holds a LoRA the adapter does not have",
    }  # more than was sent: fails as well
    with pytest.raises(UpdateFailed, match=r"k_proj.*does not have"):
        ws.update_adapter(3)
    bad.slot = dict(SENT)
    assert ws.update_adapter(4).verified and ws.adapter == "policy@v4"
    assert good.adapters == bad.adapters == {"policy@v1", "policy@v4"}


def test_adapter_digests_fold_the_scaling_into_b_once_as_vllm_does():
    a = torch.randn(4, 16).to(torch.bfloat16)
    b = torch.randn(32, 4).to(torch.bfloat16)
    config = {"r": 4, "lora_alpha": 12}  # scaling 3: not a power of two, B rounds
    got = adapter_digests({"x.lora_A.weight": a, "x.lora_B.weight": b}, config, seed=7)
    folded = b.clone()
    folded *= 12 / 4  # vLLM's LoRALayerWeights.optimize, in the adapter's dtype
    assert got == {
        "x.lora_A.weight": probe_digest(a, 7),
        "x.lora_B.weight": probe_digest(folded, 7),
    }
    assert got["x.lora_B.weight"] != probe_digest(b, 7)
    unit = adapter_digests({"x.lora_B.weight": b}, {"r": 4, "lora_alpha": 4}, seed=7)
    assert unit == {"x.lora_B.weight": probe_digest(b, 7)}


def test_engines_that_load_from_memory_and_from_disk_switch_together_or_not_at_all():
    disk, memory = AdapterEngine("disk"), AdapterEngine("memory")
    trainers = AdapterTrainers(memory={"memory": memory})
    ws = _sync([disk, memory], trainers, lora=LoraSync(root="/nonexistent"))
    stats = ws.update_adapter(1)
    assert stats.path is not None and disk.adapters == memory.adapters == {"policy@v1"}
    assert "load" in disk.calls and "load" not in memory.calls  # its data plane took it
    trainers.refused = {"memory"}
    disk.calls.clear()
    with pytest.raises(UpdateFailed, match=r"policy@v2 not loaded: engine 'memory'.*checksum"):
        ws.update_adapter(2)
    assert ws.adapter == "policy@v1" and disk.adapters == memory.adapters == {"policy@v1"}
    assert "load" not in disk.calls  # no engine keeps it anyway: no disk load was tried
    # The trainer step fails after the source rank loaded it (e.g. its deadline): unloaded.
    trainers.refused, trainers.after = set(), TimeoutError("publish_adapter: 600 s")
    with pytest.raises(TimeoutError):
        ws.update_adapter(3)
    assert ws.adapter == "policy@v1" and disk.adapters == memory.adapters == {"policy@v1"}
    only_memory = _sync([AdapterEngine("m")], AdapterTrainers(memory={}), lora=LoraSync())
    only_memory.trainers.memory = {"m": only_memory.engines["m"]}
    assert only_memory.update_adapter(1).path is None  # nothing written for anyone
