"""Score Gen-1 edits of held-out procedural-world clips:
``python eval.py [mode=compare|sweep] [checkpoint=FILE] [key=value ...]``.

Composes ``configs/eval.yaml``. Clips come from ``SyntheticWorldDataset(split="test")``, with
exact depth, flow and surface ids. ``compare`` edits each clip four ways: with the video model
(guidance ``w_t``, all frames in one sampling run) and frame by frame with the image model
(each frame a 1-frame clip, so the temporal layers never run: Gen-1's ``mu^pi``), each from
independent noise per frame or from one shared noise for every frame (the "mov2mov" habit).
``sweep`` edits with the video model over ``w_t`` and over ``t_s``. Each output is scored
with ``model.metrics.video``; markdown tables, per-clip JSON and (sweep) PNG plots are written
atomically under ``output_dir``. A bad setting or a missing checkpoint is one line on stderr
and exit status 1.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jobs.evaluation.modes import run
from jobs.evaluation.settings import EvalError
from jobs.overrides import EVAL_PATHS, exit_on_override_error, quote_path_overrides
from model.weights.checkpoint import CheckpointError


def cli(cfg: DictConfig) -> int:
    """Run; print the table. A bad setting or checkpoint is one line on stderr, status 1."""
    try:
        outcome = run(cfg)
    except (EvalError, CheckpointError, FileNotFoundError) as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 1
    print(outcome["table"])
    print(f"wrote {', '.join(outcome['files'])} ({outcome['seconds']:.1f} s)")
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    code = cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv, EVAL_PATHS)  # file names as typed in a shell
    exit_on_override_error("eval.py", "eval", sys.argv[1:])  # a typo: one line, not Hydra's
    main()
