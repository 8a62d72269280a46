"""Pure pieces of the driver: the lease lock, SyncConfig validation, plan metadata."""

import threading
import time

import pytest
import torch

from weightsync.config import SyncConfig
from weightsync.lease import LeaseLost, LocalLeaseLock, LockBusy
from weightsync.plan import build_plan
from weightsync.quant import Int4Config
from weightsync.sender import plan_metas


def test_second_update_is_refused_while_the_lease_is_live():
    lock = LocalLeaseLock()
    with (
        lock.hold("trainer-a", lease_s=30),
        pytest.raises(LockBusy, match="trainer-a"),
        lock.hold("trainer-b", lease_s=30),
    ):
        pass
    with lock.hold("trainer-b", lease_s=30):  # released in finally: the next one gets it
        assert lock.holder()[0] == "trainer-b"
    assert lock.holder() is None


def test_lock_released_when_the_update_raises():
    lock = LocalLeaseLock()
    with pytest.raises(RuntimeError, match="boom"), lock.hold("a", lease_s=30):
        raise RuntimeError("boom")
    assert lock.acquire("b", 1)


def test_dead_owner_lease_expires():
    lock = LocalLeaseLock()
    assert lock.acquire("crashed-trainer", lease_s=0.2)  # never released
    assert not lock.acquire("driver", lease_s=5)
    time.sleep(0.25)
    assert lock.acquire("driver", lease_s=5)


def test_a_live_holder_keeps_the_lease_past_its_length():
    # A failed update's clean-up can outlast the lease; the heartbeat renews it meanwhile.
    lock = LocalLeaseLock()
    with lock.hold("slow-update", lease_s=0.3):
        time.sleep(1.0)
        assert not lock.acquire("other", lease_s=5)
        assert lock.holder()[0] == "slow-update"
    assert lock.holder() is None
    assert lock.acquire("other", lease_s=5)


def test_concurrent_requests_never_interleave():
    lock, inside, overlaps, refused = LocalLeaseLock(), [], [], []

    def request(owner: str) -> None:
        try:
            with lock.hold(owner, lease_s=10):
                inside.append(owner)
                if len(inside) > 1:
                    overlaps.append(owner)
                time.sleep(0.05)
                inside.remove(owner)
        except LockBusy:
            refused.append(owner)

    threads = [threading.Thread(target=request, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert not overlaps and refused


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"transport": "rdma"}, "transport"),
        ({"pause_mode": "nap"}, "pause_mode"),
        ({"bucket_bytes": 10}, "bucket_bytes"),
        ({"step_timeout_s": 0}, "step_timeout_s"),
        ({"flush_retries": -1}, "flush_retries"),
    ],
)
def test_sync_config_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SyncConfig(**kwargs)


class Meta:
    def __init__(self, name, shape, dtype=torch.bfloat16, unit="u"):
        self.name, self.shape, self.dtype, self.unit = name, shape, dtype, unit


def test_plan_metas_expand_int4_within_the_unit():
    metas = [
        Meta("model.embed_tokens.weight", (256, 128), unit="embed"),
        Meta("model.layers.0.self_attn.q_proj.weight", (128, 128), unit="attn0"),
        Meta("model.layers.0.self_attn.q_proj.bias", (128,), unit="attn0"),
    ]
    out = plan_metas(metas, Int4Config(group_size=64, symmetric=False))
    names = [m.name for m in out]
    assert names == [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight_packed",
        "model.layers.0.self_attn.q_proj.weight_scale",
        "model.layers.0.self_attn.q_proj.weight_shape",
        "model.layers.0.self_attn.q_proj.weight_zero_point",
        "model.layers.0.self_attn.q_proj.bias",
    ]
    assert {m.unit for m in out[1:]} == {"attn0"}
    plan = build_plan(out, bucket_bytes=1 << 20)
    assert plan.total_nbytes == sum(m.dtype.itemsize * torch.Size(m.shape).numel() for m in out)
    with pytest.raises(ValueError, match=r"q_proj\.weight"):
        plan_metas(
            [Meta("model.layers.0.self_attn.q_proj.weight", (128, 100))], Int4Config(group_size=64)
        )


def _detected_within(lease, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            lease.check()
        except LeaseLost:
            return time.monotonic() - t0
        time.sleep(0.005)
    raise AssertionError("the holder never learned it lost the lease")


def test_a_holder_learns_when_another_owner_took_its_lease():
    lock = LocalLeaseLock()
    with lock.hold("a", lease_s=0.3) as lease:
        lock._state.expires = 0  # a's lease ran out (e.g. the heartbeat was starved) ...
        assert lock.acquire("b", lease_s=30)  # ... and b took it
        seconds = _detected_within(lease, 2.0)
        print(f"\nlease taken by another owner: holder told in {seconds:.3f} s")
        with pytest.raises(LeaseLost, match="another owner"):
            lease.check()
    assert lock.holder()[0] == "b"  # a's release did not free b's lease


class _FlakyLock(LocalLeaseLock):
    def __init__(self) -> None:
        super().__init__()
        self.renewals_fail = False
        self.release_fails = False

    def acquire(self, owner, lease_s):
        if self.renewals_fail:
            raise ConnectionError("lease actor unreachable")
        return super().acquire(owner, lease_s)

    def release(self, owner):
        if self.release_fails:
            raise ConnectionError("lease actor unreachable")
        super().release(owner)


def test_renewals_failing_for_a_whole_lease_lose_it():
    lock = _FlakyLock()
    with lock.hold("a", lease_s=0.3) as lease:
        lock.renewals_fail = True
        seconds = _detected_within(lease, 3.0)
        print(f"\nrenewals failing: holder told in {seconds:.3f} s (lease 0.3 s)")
        assert seconds >= 0.2  # a missed beat alone is not a loss: the lease has slack


def test_a_failed_release_never_hides_the_result():
    lock = _FlakyLock()
    with pytest.raises(ValueError, match="the update's own error"), lock.hold("a", lease_s=30):
        lock.release_fails = True
        raise ValueError("the update's own error")
    other = _FlakyLock()
    with other.hold("b", lease_s=30):  # and without an error, it is not raised either
        other.release_fails = True
