"""Train a Gen-1 model (or a component): ``python train.py experiment=tiny [key=value ...]``.

Composes ``configs/train.yaml``, then ``jobs.training``: the config is checked (a config that
cannot work is one line on stderr and exit status 1, before any work), the DataModule, the
module, callbacks, loggers and the Trainer are built, and the model is fitted.
``ckpt_path=PATH`` or ``ckpt_path=last`` resumes exactly where the run stopped.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jobs.overrides import TRAIN_PATHS, exit_on_override_error, quote_path_overrides
from jobs.training import config_error_line, fit, setup


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        parts = setup(cfg)
    except Exception as err:
        line = config_error_line(err)
        if line is None:
            raise
        print(f"train.py: error: {line}", file=sys.stderr)
        sys.exit(1)
    fit(cfg, *parts)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv, TRAIN_PATHS)  # file names as typed in a shell
    exit_on_override_error("train.py", "train", sys.argv[1:])  # a typo: one line, not Hydra's
    main()
