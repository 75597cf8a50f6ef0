"""The main job on the bundled default. Until the tiny world model is bundled (issue 8),
a smoke run: train the tiny Gen-1 for a few steps on the procedural world and say so."""

from __future__ import annotations

import sys
import tempfile

from hydra import compose, initialize_config_dir

from train import train


def main() -> None:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [
            "experiment=tiny",
            f"run_dir={run_dir}",
            "trainer.max_steps=10",
            "trainer.limit_val_batches=1",
            "trainer.val_check_interval=10",
        ]
        with initialize_config_dir(config_dir=f"{sys.path[0]}/configs", version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        trainer = train(cfg)
        metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}
        print(
            f"demo: trained the tiny Gen-1 for {trainer.global_step} steps on the procedural "
            f"world (CPU); metrics {metrics}; checkpoints were in {run_dir}/checkpoints"
        )


if __name__ == "__main__":
    main()
