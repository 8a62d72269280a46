"""Everything the demo loop runs against: model dirs, the Ray trainer group, the engine.

::

    with DemoRuntime.start(cfg) as rt:      # model -> engine + trainer actors (in parallel)
        sync = make_sync(rt)                # e.g. WeightSync over rt.group, rt.engine_spec
        report = run_demo(cfg, sync, rt)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsync.engines.spec import EngineSpec
from weightsync.private_dir import private_dir
from weightsync.ray_group import TrainerGroup
from weightsync_demo.config import DemoConfig
from weightsync_demo.model import ModelDirs, int4_config, tiny_qwen2_config, write_model_dirs
from weightsync_demo.policy import PolicyWorker, as_hf_dict
from weightsync_demo.rollout import RolloutClient

log = logging.getLogger("weightsync_demo")


@dataclass
class DemoRuntime:
    cfg: DemoConfig
    dirs: ModelDirs
    hf_config: dict
    group: TrainerGroup
    engine_spec: EngineSpec
    rollout: RolloutClient
    server: Any = None
    """The VllmServer this runtime launched (None for an external engine)."""
    owns_ray: bool = False
    """This runtime started the local Ray cluster (and stops it)."""
    on_close: list[Callable[[], None]] = field(default_factory=list)
    """Run first by ``close``, while the trainers and the engine still exist (e.g. the
    driver's own clean-up on the trainer actors)."""

    @classmethod
    def start(cls, cfg: DemoConfig) -> DemoRuntime:
        out = private_dir(cfg.out_dir)  # the engine loads the models written here: only ours
        dirs = write_model_dirs(cfg, out / "models")
        hf_config = as_hf_dict(tiny_qwen2_config(cfg))
        owns_ray = _start_local_ray(cfg, out)
        try:
            group, server = _start_trainers_and_engine(cfg, dirs, hf_config, out)
        except BaseException:
            if owns_ray:
                _stop_ray()
            raise
        url = server.url if server is not None else cfg.engine_url
        key = server.api_key if server is not None else cfg.api_key  # generated if not given
        spec = EngineSpec(
            kind=cfg.engine, url=url, api_key=key, tp_size=cfg.engine_tp, timeout_s=cfg.timeout_s
        )
        rollout = RolloutClient(url, cfg.engine, key, cfg.timeout_s)
        return cls(cfg, dirs, hf_config, group, spec, rollout, server, owns_ray)

    def engine_version(self) -> str | None:
        """The policy version the engine serves: its weight version, or with LoRA the
        newest adapter version it holds (adapter syncs leave the base's label alone)."""
        if self.cfg.lora_rank:
            return self.rollout.newest_adapter()
        engine = self.engine_spec.connect()
        try:
            return engine.get_version()
        finally:
            with contextlib.suppress(Exception):
                engine.close()

    def close(self) -> None:
        for fn in reversed(self.on_close):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - the runtime still comes down
                log.warning("demo runtime: clean-up %r failed: %s", fn, e)
        self.rollout.close()
        self.group.shutdown()
        if self.server is not None:
            self.server.stop()
        if self.owns_ray:
            _stop_ray()

    def __enter__(self) -> DemoRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_local_ray(cfg: DemoConfig, out: Path) -> bool:
    """Start a local Ray cluster whose workers log to files, not to this console (megatron's
    and torch's warnings, once per worker); True if started here. An existing cluster
    (``ray_address``, ``RAY_ADDRESS`` under ``ray job submit``) is joined by the trainer group
    as it is. Remote errors still come back: a failed call raises with the worker's traceback,
    and Ray reports dead workers; ``<out>/ray_logs`` links to the workers' log files."""
    import ray

    if ray.is_initialized() or cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        return False
    # Ray's notice, on every start, that token auth is on (and how to turn it off): it stays
    # on, the notice goes. Ray's other warnings (e.g. a worker that died) still print.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _drop_token_auth_notice
    )
    # address="local": a new cluster even when another one runs on this machine.
    ctx = ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    link = out / "ray_logs"
    with contextlib.suppress(OSError):
        link.unlink(missing_ok=True)
        link.symlink_to(Path(ctx.address_info["session_dir"]) / "logs")
    return True


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled")


def _stop_ray() -> None:
    import ray

    ray.shutdown()


def _start_trainers_and_engine(
    cfg: DemoConfig, dirs: ModelDirs, hf_config: dict, out: Path
) -> tuple[TrainerGroup, Any]:
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Both take ~30 s on 2 cores: the engine starts while the trainer actors do.
        pending = pool.submit(_launch_vllm, cfg, dirs, out) if cfg.engine_url is None else None
        try:
            group = _start_trainers(cfg, dirs, hf_config)
        except BaseException:
            if pending is not None:
                with contextlib.suppress(BaseException):
                    pending.result(timeout=cfg.timeout_s).stop()
            raise
        try:
            server = pending.result(timeout=cfg.timeout_s) if pending else None
        except BaseException:
            group.shutdown()
            raise
    return group, server


def _start_trainers(cfg: DemoConfig, dirs: ModelDirs, hf_config: dict) -> TrainerGroup:
    from safetensors.torch import load_file

    group = TrainerGroup.create(
        cfg.num_workers,
        tp=cfg.tp,
        seed=cfg.seed,
        worker_cls=PolicyWorker,
        ray_address=cfg.ray_address,
        timeout_s=cfg.timeout_s,
    )
    try:
        weights = load_file(dirs.hf_dir / "model.safetensors")
        lr, int4 = cfg.lr, int4_config(cfg)
        lora = (cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else None
        build = PolicyWorker.build_policy
        group.run_all(build, weights, hf_config, lr, int4, cfg.tp, lora, timeout_s=cfg.timeout_s)
    except BaseException:
        group.shutdown()
        raise
    return group


def _launch_vllm(cfg: DemoConfig, dirs: ModelDirs, out: Path) -> Any:
    from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

    server_cfg = VllmServerConfig(
        model_dir=str(dirs.serve_dir),
        log_path=str(out / "vllm_server.log"),
        api_key=cfg.api_key,
        tensor_parallel_size=cfg.engine_tp,
        max_lora_rank=cfg.lora_rank,
        max_model_len=256,
        startup_timeout_s=cfg.timeout_s,
        # /inference/v1/generate: token ids in, per-sample weight versions out.
        extra_args=("--enable-scale-out",),
    )
    log.info("starting vllm serve for %s", dirs.serve_dir)
    return VllmServer(server_cfg).start()
