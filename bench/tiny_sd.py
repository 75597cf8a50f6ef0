"""The bundled tiny SD on held-out clips of the procedural world (test split): its diffusion
loss, and what its mov2mov edits score with Gen-1's metrics (``model/metrics/video.py``,
scored by the bundled tiny CLIP).

Loss: eps MSE of the EMA UNet on 256 test frames (VAE posterior means, their captions'
hidden states), timesteps and noise from fixed seeds, plain and min-SNR-5 weighted (the
training's ``val/loss`` weighting). Edits: each of ``--clips`` test clips (8 frames) is
edited toward the caption of another test clip, so the edit must change its look; the
prompt consistency of the edit with that prompt is compared with the input's and with an
unrelated prompt's (the caption of a third clip). Prints a markdown table.

Run: ``python bench/tiny_sd.py [--clips 10] [--steps 20] [--strength 0.75] [--w 7.5]``.
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
from model.diffusion.loss import training_loss  # noqa: E402
from model.editing.pipeline import edit_video  # noqa: E402
from model.editing.settings import EditSettings  # noqa: E402
from model.encoders.clip import load_clip  # noqa: E402
from model.metrics.video import frame_consistency, prompt_consistency  # noqa: E402
from model.sd.loading import load_sd  # noqa: E402

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "clip_tiny.safetensors"


@torch.no_grad()
def held_out_loss(model, frames: int = 256, repeats: int = 4) -> dict[str, float]:
    """Mean eps MSE (plain and min-SNR-5 weighted) on ``frames`` test-split frames."""
    world = SyntheticWorldDataset(num_clips=frames, num_frames=1, split="test")
    samples = [world[i] for i in range(frames)]
    images = torch.stack([s["frames"][0] for s in samples])
    latents = torch.cat([model.vae.encode(chunk) for chunk in images.split(64)])
    context = torch.cat(
        [model.text_encoder.encode([s["caption"] for s in samples[i : i + 64]])
         for i in range(0, frames, 64)]
    )  # fmt: skip
    fn = model.model_fn()
    results = {"plain": [], "min_snr_5": []}
    for repeat in range(repeats):
        for name, gamma in (("plain", None), ("min_snr_5", 5.0)):
            gen = torch.Generator().manual_seed(repeat)
            loss = training_loss(
                lambda x, t, context: fn(x, t, context),
                latents,
                model.schedule,
                model.parameterization,
                {"context": context},
                min_snr_gamma=gamma,
                generator=gen,
            )
            results[name].append(float(loss.loss))
    return {name: statistics.mean(values) for name, values in results.items()}


@torch.no_grad()
def edits(model, clip, count: int, settings: EditSettings) -> list[dict[str, float]]:
    """Per clip: prompt consistency of input and edit with the edit prompt, of the edit with
    an unrelated prompt, and the edit's frame consistency."""
    world = SyntheticWorldDataset(num_clips=3 * count, num_frames=8, split="test")
    rows = []
    for i in range(count):
        source = world[i]
        prompt = world[count + i]["caption"]
        unrelated = world[2 * count + i]["caption"]
        frames = source["frames"][None]
        result = edit_video(
            model,
            frames,
            model.encode_prompt(prompt),
            settings,
            generator=torch.Generator().manual_seed(i),
        )
        edited = result.frames[0]
        rows.append(
            {
                "input_prompt": prompt_consistency(clip, frames[0], prompt),
                "edit_prompt": prompt_consistency(clip, edited, prompt),
                "edit_unrelated": prompt_consistency(clip, edited, unrelated),
                "edit_frame_consistency": frame_consistency(clip, edited),
                "input_frame_consistency": frame_consistency(clip, frames[0]),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--w", type=float, default=7.5)
    parser.add_argument("--checkpoint", default=str(TINY_SD))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_sd(args.checkpoint)
    clip = load_clip(CLIP, "clip_tiny")
    loss = held_out_loss(model)
    print(f"held-out loss (256 test frames): eps MSE {loss['plain']:.4f}, "
          f"min-SNR-5 weighted {loss['min_snr_5']:.4f}")  # fmt: skip
    settings = EditSettings(
        steps=args.steps, strength=args.strength, w=args.w, sampler="dpmpp_2m", method="mov2mov"
    )
    rows = edits(model, clip, args.clips, settings)
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    gain = [r["edit_prompt"] - r["edit_unrelated"] for r in rows]
    print(f"\nmov2mov, {args.clips} test clips x 8 frames, {args.steps} DPM++ 2M steps, "
          f"strength {args.strength}, w {args.w}\n")  # fmt: skip
    print("| | prompt consistency |\n|---|---|")
    print(f"| input, with the edit prompt | {mean['input_prompt']:.4f} |")
    print(f"| **edit, with the edit prompt** | **{mean['edit_prompt']:.4f}** |")
    print(f"| edit, with an unrelated prompt | {mean['edit_unrelated']:.4f} |")
    spread = statistics.stdev(gain) / len(gain) ** 0.5 if len(gain) > 1 else 0.0
    wins = sum(g > 0 for g in gain)
    print(f"\nedit prompt - unrelated prompt: {statistics.mean(gain):+.4f} "
          f"(standard error {spread:.4f}), higher on {wins} of {len(gain)} clips")  # fmt: skip
    print(f"frame consistency: input {mean['input_frame_consistency']:.4f}, "
          f"edit {mean['edit_frame_consistency']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
