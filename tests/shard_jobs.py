"""Processes of the sharded-transfer tests: megatron trainer ranks sending their own slices,
and engine-rank stand-ins receiving theirs, in one gloo group (weightsync.shard_transfer)."""

from __future__ import annotations

import io
import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.bridge_helpers import collect, hf_config
from tests.holdings_jobs import distinct_values
from weightsync.engine_shards import EngineLayout, ModelShape
from weightsync.net import free_port
from weightsync.quant.config import Int4Config
from weightsync.shard_transfer import Tensors

BOUND = 1 << 16  # small rounds: many of them, the deadlock-free ordering is exercised


def config_of(family: str | tuple[str, dict]):
    """A bridge test model by family name, or (model_type, tiny_config overrides)."""
    if isinstance(family, str):
        return hf_config(family, num_hidden_layers=2)
    from tests.models import tiny_config

    return tiny_config(family[0], **family[1])


def plan_of(family, sizes_kw: dict, engines: list, int4: Int4Config | None, dtype=torch.float32):
    """What both sides derive from the configs alone: the plan and the tensors' description."""
    from megatron_bridge.holdings import ParallelSizes, plan_holdings
    from weightsync.reshard import plan_reshard

    cfg = config_of(family)
    holdings = plan_holdings(cfg, ParallelSizes(**sizes_kw))
    itemsize = {h.name: dtype.itemsize for h in holdings}
    model = ModelShape.of(cfg)
    plan = plan_reshard(holdings, itemsize, engines, model, int4, split_bytes=1 << 12)
    shapes = {h.name: h.shape for h in holdings}
    return cfg, plan, Tensors(shapes, dict.fromkeys(shapes, dtype), int4)


def trainer(
    rank: int, ports: tuple[int, int], family, sizes_kw: dict, engines, int4, dtype=torch.float32
) -> dict:
    import megatron_bridge as mb
    from megatron_bridge.holdings import ParallelSizes, live_holdings, plan_holdings, shard_reader
    from weightsync.shard_transfer import send_slices
    from weightsync.transport.broadcast import init_weight_group

    world = sizes_kw["world"]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mb.enable_cpu_megatron()
    mb.init_parallel(tp=sizes_kw["tp"], pp=sizes_kw["pp"], ep=sizes_kw["ep"], etp=sizes_kw["etp"])
    cfg, plan, tensors = plan_of(family, sizes_kw, engines, int4, dtype)
    chunks = mb.build_model(cfg, params_dtype=dtype)
    distinct_values(chunks[0], std=0.08 if dtype == torch.bfloat16 else 1.0)
    live = live_holdings(chunks, cfg)
    agree = live == plan_holdings(cfg, ParallelSizes(**sizes_kw))  # what the receivers planned
    read = shard_reader(chunks, cfg, live)
    full = {n: t.clone() for n, t in mb.export_hf_weights(chunks, cfg)}  # collective
    total = world + sum(e.tp for e in engines)
    group = init_weight_group("127.0.0.1", ports[1], total, rank, "shards")
    sent = send_slices(plan, rank, read, tensors, group, world, BOUND)
    return {
        "full": full if rank == 0 else None,
        "sent": sent,
        "planned": plan.sent.get(rank, 0),
        "agree": agree,
    }


def receiver(
    rank: int, ports: tuple[int, int], family, sizes_kw: dict, engines, int4, dtype=torch.float32
) -> dict:
    from weightsync.shard_transfer import receive_slices
    from weightsync.transport.broadcast import init_weight_group

    cfg, plan, tensors = plan_of(family, sizes_kw, engines, int4, dtype)
    at, engine = rank - sizes_kw["world"], 0
    while at >= engines[engine].tp:
        at, engine = at - engines[engine].tp, engine + 1
    slices = tensors.worker_slices(engines[engine], ModelShape.of(cfg), at)
    total = sizes_kw["world"] + sum(e.tp for e in engines)
    group = init_weight_group("127.0.0.1", ports[1], total, rank, "shards")
    got = receive_slices(plan, engine, at, slices, tensors, group, BOUND)
    received = sum(t.numel() * t.element_size() for t in got.values())
    return {
        "engine": engine,
        "worker": at,
        "slices": got,
        "boxes": {n: b for n, (b, _) in slices.items()},
        "received": received,
        "served": plan.served[(engine, at)],
    }


def _run(role, rank: int, ports, args, results) -> None:
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()
        torch.save(role(rank, ports, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - the traceback travels back to the test
        results.put((rank, "error", traceback.format_exc()))


def run_transfer(
    family: str,
    sizes_kw: dict,
    engines: list[EngineLayout],
    int4: Int4Config | None = None,
    timeout: float = 240,
):
    """Trainer ranks 0..world-1 and one receiver per engine rank; results by group rank."""
    world = sizes_kw["world"]
    roles = [trainer] * world + [receiver] * sum(e.tp for e in engines)
    return run_roles(roles, (family, sizes_kw, engines, int4), (free_port(), free_port()), timeout)


def run_roles(roles: list, args: tuple, ports: tuple[int, int], timeout: float = 240) -> list:
    """``roles[r](r, ports, *args)`` in one spawned process per rank; results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_run, args=(role, r, ports, args, results), daemon=True)
        for r, role in enumerate(roles)
    ]
    return collect(procs, results, timeout)
