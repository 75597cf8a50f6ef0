"""The main job end to end on CPU, until the trained tiny world model is bundled (issue 8).

1. Renders a held-out clip of the procedural world (video + its exact depth).
2. Trains the tiny Gen-1 briefly with ``train.py experiment=tiny``.
3. Edits the clip with ``infer.py`` (content: its first frame; structure: its depth) and
   writes the edited mp4, a side-by-side preview and the JSON sidecar under outputs/demo/.

The model is trained for seconds, not hours, so the edit shows the pipeline, not quality.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from data.io import write_video
from data.synthetic import SyntheticWorldDataset

OUT = Path("outputs/demo")


def run(*args: str) -> None:
    print("$", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main(train_steps: int = 30) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    clip = SyntheticWorldDataset(1, num_frames=16, size=64, split="test")[0]
    write_video(OUT / "input.mp4", clip["frames"], fps=8)
    np.save(OUT / "input_depth.npy", clip["depth"][:, 0].numpy())
    print(f"demo: wrote a held-out world clip: {clip['caption']!r} -> {OUT / 'input.mp4'}")

    run(
        "train.py",
        "experiment=tiny",
        f"trainer.max_steps={train_steps}",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress",
        f"hydra.run.dir={OUT / 'train'}",
    )
    run(
        "infer.py",
        f"input={OUT / 'input.mp4'}",
        f"output={OUT / 'edited.mp4'}",
        f"checkpoint={OUT / 'train' / 'checkpoints' / 'last.ckpt'}",
        "reference_frame=0",
        f"depth={OUT / 'input_depth.npy'}",
        "resolution=64",
        "steps=10",
        "sampler=ddim",
        "w=3",
        "seed=0",
        "preview=true",
        "progress=false",
    )
    sidecar = json.loads((OUT / "edited.json").read_text())
    print(
        f"demo: trained the tiny Gen-1 for {train_steps} steps, then edited "
        f"{sidecar['frames']['count']} frames in {len(sidecar['windows'])} temporal windows "
        f"({sidecar['timing']['edit_s']:.1f} s); wrote {OUT / 'edited.mp4'}, "
        f"{OUT / 'edited.preview.mp4'} (input | depth | output) and {OUT / 'edited.json'}"
    )


if __name__ == "__main__":
    main()
