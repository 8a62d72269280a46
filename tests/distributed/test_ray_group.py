"""A real 2-actor trainer group on a local Ray cluster: ranks, gloo collectives across actors,
remote failures named by rank with their traceback, deadlines, shutdown."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group():
    pytest.importorskip("ray")
    from weightsync.ray_group import TrainerGroup

    g = TrainerGroup.create(2, tp=2, local_num_cpus=2, timeout_s=120)
    yield g
    g.shutdown()


def _coords(worker):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return worker.rank, worker.world_size, dist.get_rank(), ps.get_tensor_model_parallel_rank()


def _all_reduce(worker, base: float):
    import torch
    import torch.distributed as dist

    t = torch.full((4,), base + worker.rank)
    dist.all_reduce(t)
    return t.tolist()


def _fail_on(worker, rank: int):
    if worker.rank == rank:
        raise ValueError(f"boom on rank {worker.rank}")
    return "ok"


def _die_on(worker, rank: int):
    if worker.rank == rank:
        os._exit(1)  # a crashed trainer process, not an exception
    time.sleep(0.5)
    return "ok"


def _rank_and(worker, x: int = 0):
    return worker.rank, x


def _sleep(worker, seconds: float):
    time.sleep(seconds)


def test_ranks_and_megatron_layout(group):
    assert group.world_size == 2
    assert group.run_all(_coords, timeout_s=60) == [(0, 2, 0, 0), (1, 2, 1, 1)]


def test_all_reduce_across_actors(group):
    assert group.run_all(_all_reduce, 1.5, timeout_s=60) == [[4.0] * 4, [4.0] * 4]


def test_run_rank_and_kwargs(group):
    assert group.run_rank(1, _rank_and, x=7, timeout_s=60) == (1, 7)
    with pytest.raises(ValueError, match="rank=2"):
        group.run_rank(2, _coords)


def test_remote_exception_names_rank_and_keeps_traceback(group):
    from weightsync.ray_group import RankFailed

    with pytest.raises(RankFailed) as info:
        group.run_all(_fail_on, 1, timeout_s=60)
    assert info.value.rank == 1
    text = str(info.value)
    assert "rank 1 failed in _fail_on" in text
    assert "boom on rank 1" in text
    assert 'test_ray_group.py", line' in text and "in _fail_on" in text  # the remote frames
    # The group stays usable after a failure that was not inside a collective.
    assert group.run_all(_fail_on, 5, timeout_s=60) == ["ok", "ok"]


def _engine_fails(worker):
    from weightsync.engines.base import EngineFailed

    raise EngineFailed(("vllm-b",), "bucket 2: engine 'vllm-b' failed: refused")


def test_an_engine_failure_on_a_rank_reaches_the_driver_typed(group):
    from weightsync.driver import _failed_engines
    from weightsync.engines.base import EngineFailed
    from weightsync.ray_group import RankFailed

    with pytest.raises(RankFailed) as info:
        group.run_all(_engine_fails, timeout_s=60)
    assert isinstance(info.value.__cause__, EngineFailed)
    assert _failed_engines(info.value) == {"vllm-b"}  # the names, not a guess from the text


def test_deadline_fires(group):
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 1.0 s"):
        group.run_all(_sleep, 4.0, timeout_s=1.0)
    assert time.monotonic() - t0 < 3.0


def test_shutdown_is_idempotent():
    pytest.importorskip("ray")

    from weightsync.ray_group import RankFailed, TrainerGroup

    # Joins the module's running session (the group above), so it does not own Ray.
    g = TrainerGroup.create(2, tp=1, timeout_s=120)
    assert g.run_all(_all_reduce, 0.0, timeout_s=60) == [[1.0] * 4, [1.0] * 4]
    # A rank whose process dies is named; run_all does not wait for the deadline.
    t0 = time.monotonic()
    with pytest.raises(RankFailed, match="rank 1 failed in _die_on") as info:
        g.run_all(_die_on, 1, timeout_s=60)
    assert info.value.rank == 1 and time.monotonic() - t0 < 30
    actor = g.actors[0]
    g.shutdown()
    g.shutdown()
    assert _dies_within(actor, 30.0)


def _dies_within(actor, seconds: float) -> bool:
    """ray.kill is asynchronous: poll until calls to the actor fail as a dead actor's do."""
    import ray

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            ray.get(actor.execute.remote(_rank_and), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        except ray.exceptions.RayTaskError:
            pass  # still alive, its process group already destroyed
        except Exception as e:  # Ray 2.60 refuses submissions to a removed actor this way
            if "Can't find actor" in str(e):
                return True
            raise
        time.sleep(0.2)
    return False


def _auth_mode(worker):
    import os

    return os.environ.get("RAY_AUTH_MODE")


def test_the_cluster_we_start_keeps_token_auth_on(group):
    import os

    # Ray 2.60 turns token auth on for a new local cluster unless told "disabled": nothing of
    # ours may say it, in the driver or in the actors that run the trainer.
    assert os.environ.get("RAY_AUTH_MODE") != "disabled"
    assert all(mode != "disabled" for mode in group.run_all(_auth_mode, timeout_s=60))
