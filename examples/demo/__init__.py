"""The embedded demo: a GRPO-style RL loop on CPU (Ray trainer group + an inference engine).

``DemoRuntime.start(cfg)`` builds the model, the trainer group and the engine;
``run_demo(cfg, sync, runtime)`` runs the loop and returns a ``Report``. Nothing heavy is
imported here.
"""

from weightsync_demo.config import DemoConfig

__all__ = ["DemoConfig"]
