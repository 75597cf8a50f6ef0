"""The bundled tiny depth ControlNet on held-out clips of the procedural world (test split):
how much better the tiny SD's edits keep the input's structure with it than without.

Each of ``--clips`` test clips (8 frames, 64x64) is edited by mov2mov toward the caption of
another test clip, from one seed, with and without the ControlNet (``hint: depth`` from the
bundled tiny MiDaS, scale 1), at strength 1 (the input reaches the edit only through the
ControlNet) and at ``--strength`` (img2img). Scored with Gen-1's metrics
(``model/metrics/video.py``): structure fidelity (the scale/shift-invariant depth error of
output vs input, lower is better; MiDaS tiny on both), prompt consistency with the edit
prompt and frame consistency (tiny CLIP). Prints a markdown table.

Run: ``python bench/tiny_controlnet.py [--clips 10] [--steps 20] [--strength 0.75]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import summary  # noqa: E402
from data.synthetic import SyntheticWorldDataset  # noqa: E402
from model.editing.pipeline import edit_video, video_depth  # noqa: E402
from model.editing.settings import EditSettings  # noqa: E402
from model.encoders.clip import load_clip  # noqa: E402
from model.encoders.depth import DepthEstimator, load_midas  # noqa: E402
from model.encoders.hints import depth_hint  # noqa: E402
from model.metrics.video import (  # noqa: E402
    frame_consistency,
    prompt_consistency,
    structure_fidelity,
)
from model.sd.control import Control, ControlUnit  # noqa: E402
from model.sd.controlnet import load_controlnet  # noqa: E402
from model.sd.loading import load_sd  # noqa: E402

BUNDLE = ROOT / "bundle"
TINY_SD = BUNDLE / "tiny_sd" / "tiny_sd.safetensors"
CONTROLNET = BUNDLE / "tiny_sd" / "tiny_controlnet_depth.safetensors"
MIDAS = BUNDLE / "tiny_world" / "midas_tiny.safetensors"
CLIP = BUNDLE / "tiny_world" / "clip_tiny.safetensors"


@torch.no_grad()
def compare(
    clips: int = 10,
    steps: int = 20,
    strengths: tuple[float, ...] = (1.0, 0.75),
    controlnet: Path = CONTROLNET,
    num_frames: int = 8,
) -> dict[str, dict[str, float]]:
    """Mean scores per setting (``"strength 1.0, ControlNet"`` ...) over ``clips`` clips."""
    model = load_sd(TINY_SD)
    net = load_controlnet(controlnet, model.config.unet)
    midas = DepthEstimator(load_midas(MIDAS, "midas_tiny"))
    clip = load_clip(CLIP, "clip_tiny")
    world = SyntheticWorldDataset(num_clips=2 * clips, num_frames=num_frames, split="test")
    scores: dict[str, list[dict[str, float]]] = {}
    for i in range(clips):
        frames = world[i]["frames"][None]
        prompt = model.encode_prompt(world[clips + i]["caption"])
        depth_in = video_depth(model, frames, midas)
        hint = depth_hint(depth_in[0])[None]
        for strength in strengths:
            for with_control in (False, True):
                control = Control((ControlUnit(net, hint, 1.0),)) if with_control else None
                result = edit_video(
                    model,
                    frames,
                    prompt,
                    EditSettings(steps=steps, strength=strength, sampler="dpmpp_2m"),
                    generator=torch.Generator().manual_seed(i),
                    control=control,
                )
                out = result.frames
                depth_out = video_depth(model, out, midas)[0]
                name = f"strength {strength}, " + (
                    "ControlNet" if with_control else "no ControlNet"
                )
                scores.setdefault(name, []).append({
                    "structure error": structure_fidelity(depth_in[0], depth_out),
                    "prompt consistency": prompt_consistency(clip, out[0], prompt.prompt),
                    "frame consistency": frame_consistency(clip, out[0]),
                })  # fmt: skip
    return {
        name: {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
        for name, rows in scores.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--controlnet", type=Path, default=CONTROLNET)
    args = parser.parse_args()
    results = compare(args.clips, args.steps, (1.0, args.strength), args.controlnet)
    columns = list(next(iter(results.values())))
    print("| setting | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
