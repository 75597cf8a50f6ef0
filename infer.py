"""Edit a video with a Gen-1 model:
``python infer.py input=IN.mp4 output=OUT.mp4 checkpoint=FILE reference=IMAGE [key=value ...]``.

Composes ``configs/infer.yaml``; checks every input before the model is loaded (the audio's
fate included); reads the chosen frames upright at the working resolution; edits them
(``model.editing``); writes an H.264 mp4 at the source fps (over the stride) or, for a
variable-rate source, at the frames' source times, with the audio of exactly the kept span
(as AAC), an optional side-by-side preview and a JSON sidecar of every setting. Outputs are
written to temporary files and moved into place; the input is never overwritten. A bad input
ends the run with one line on stderr and exit status 1, leaving no output behind.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from data.media import MediaError
from jobs.editing.request import InferError
from jobs.editing.run import run
from jobs.overrides import INFER_PATHS, exit_on_override_error, quote_path_overrides
from model.weights.checkpoint import CheckpointError


def cli(cfg: DictConfig) -> int:
    """Run; a bad input or checkpoint is one line on stderr and exit status 1; Ctrl-C is one
    line and status 130, with no output left behind."""
    try:
        outcome = run(cfg)
    except (InferError, MediaError, CheckpointError, FileNotFoundError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are staged in temporary files: none was moved in
        print("infer.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(
        f"wrote {cfg.output}: {outcome['frames']['count']} frames, "
        f"{outcome['size']['output'][1]}x{outcome['size']['output'][0]}, "
        f"{outcome['frames']['fps']:g} fps ({outcome['frames']['timing']}), "
        f"seed {outcome['seed']}, audio {outcome['audio']}"
    )
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="infer")
def main(cfg: DictConfig) -> None:
    code = cli(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv = quote_path_overrides(sys.argv, INFER_PATHS)  # file names as typed in a shell
    exit_on_override_error("infer.py", "infer", sys.argv[1:])  # a typo: one line, not Hydra's
    main()
