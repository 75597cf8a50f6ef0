"""The bundled tiny world model: within its size budget, loadable, and what `python infer.py`
runs with no overrides (here with fewer steps and frames, into a temporary folder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import infer
from data.media import read_frames, read_image
from model.editing.content import image_content
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.encoders.prior import load_prior
from model.training.loading import load_gen1
from model.weights.release import native_resolution
from tests.sd_layout import ROOT

BUNDLE = ROOT / "bundle" / "tiny_world"


def test_the_bundle_is_at_most_60_mb_of_safetensors_with_a_card():
    files = list(BUNDLE.glob("*.safetensors"))
    assert {f.name for f in files} >= {"gen1_tiny_world.safetensors", "prior_tiny.safetensors"}
    assert sum(f.stat().st_size for f in files) <= 60 * 2**20
    assert "## How it was made" in (BUNDLE / "CARD.md").read_text()


def test_the_release_the_prior_and_the_clip_fit_together():
    gen1 = load_gen1(BUNDLE / "gen1_tiny_world.safetensors")
    assert gen1.depth is not None and gen1.structure_channels == 1
    assert any(".temporal." in name for name, _ in gen1.unet.named_parameters())
    assert native_resolution(BUNDLE / "gen1_tiny_world.safetensors") == 64
    assert load_prior(BUNDLE / "prior_tiny.safetensors").embed_dim == gen1.clip.embed_dim


@pytest.mark.parametrize("content", [[], ["prompt='a red striped sphere on a cyan floor'"]])
def test_infer_defaults_edit_a_bundled_clip(content, tmp_path):
    out = tmp_path / "edited.mp4"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "infer",
            overrides=[f"output={out}", "steps=2", "max_frames=4", "progress=false", *content],
        )
    outcome = infer.run(cfg)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["size"]["output"] == [64, 64] and outcome["frames"]["count"] == 4
    if content:
        assert sidecar["settings"]["prompt_mode"] == "prior"
    else:
        assert sidecar["settings"]["reference"].endswith("samples/clip_a_ref.png")


def test_the_bundled_edit_is_unchanged_from_its_recorded_golden():
    """A fixed-seed edit of a bundled clip equals the one recorded before the model/ package
    layout (issue 15) to within one 8-bit level: a refactor that changes the maths fails here.
    (Bit-identical on the machine that recorded it; one level allows other CPUs' rounding.)"""
    gen1 = load_gen1(BUNDLE / "gen1_tiny_world.safetensors")
    frames = read_frames(BUNDLE / "samples" / "clip_a.mp4", list(range(12)), (64, 64))
    reference = read_image(BUNDLE / "samples" / "clip_a_ref.png")
    image = torch.from_numpy(reference.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    settings = EditSettings(steps=8, noise_correlation=1.0)
    result = edit_video(
        gen1,
        frames,
        image_content(gen1, image),
        settings,
        generator=torch.Generator().manual_seed(0),
    )
    pixels = ((result.frames[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    golden = torch.from_numpy(np.load(ROOT / "tests" / "data" / "bundle_edit_golden.npz")["frames"])
    difference = (pixels.int() - golden.int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01
