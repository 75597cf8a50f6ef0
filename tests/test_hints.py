"""ControlNet hints as ControlNet's annotators make them (controlnet_aux: HED, Canny), and the
depth hint's convention (3 channels in [0, 1], near = bright)."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from model.encoders.hed import HED, load_hed, softedge_hint
from model.encoders.hints import canny_hint, depth_hint, to_uint8
from model.weights.checkpoint import CheckpointError
from tests.sd_layout import randomise


def annotator(name: str):
    """``controlnet_aux.<name>`` without the package's __init__, which imports every
    annotator's heavy dependencies (mediapipe, ...)."""
    if not hasattr(sys.modules.get("controlnet_aux"), "_stub"):
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None:
            pytest.skip("controlnet_aux (requirements-nodeps.txt) is not installed")
        package = types.ModuleType("controlnet_aux")
        package.__path__ = [str(Path(spec.origin).parent)]
        package._stub = True
        sys.modules["controlnet_aux"] = package
    return importlib.import_module(f"controlnet_aux.{name}")


def frames(seed: int = 0, size: int = 64) -> torch.Tensor:
    """Smooth random frames in [-1, 1] (edges where the blobs meet)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.rand(2, 3, 6, 6, generator=gen)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic") * 2 - 1


def test_softedge_equals_controlnet_aux_hed(tmp_path):
    hed_module = annotator("hed")
    state = randomise(HED().state_dict(), 3)
    state["norm"] = torch.tensor([120.0, 115.0, 105.0]).view(1, 3, 1, 1)
    torch.save(state, tmp_path / "ControlNetHED.pth")
    net = hed_module.ControlNetHED_Apache2()
    net.load_state_dict(torch.load(tmp_path / "ControlNetHED.pth"))
    detector = hed_module.HEDdetector(net.float().eval())
    video = frames()
    ours = softedge_hint(load_hed(tmp_path / "ControlNetHED.pth"), video)
    assert ours.shape == (2, 3, 64, 64) and 0 <= ours.min() and ours.max() <= 1
    for image, hint in zip(to_uint8(video), ours, strict=True):
        theirs = detector(image, detect_resolution=64, image_resolution=64, output_type="np")
        # theirs is floor(255 edge) as uint8: ours scaled is within one 8-bit level above
        gap = hint.permute(1, 2, 0).numpy().astype(np.float64) * 255 - theirs
        assert gap.min() > -1e-3 and gap.max() < 1 + 1e-3
    assert ours.std() > 0.01  # not a constant map


def test_hed_file_mismatch_names_the_file(tmp_path):
    torch.save({"norm": torch.zeros(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth.*missing keys: block1"):
        load_hed(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="ControlNetHED.pth"):
        load_hed(tmp_path / "none.pth")


def test_canny_equals_controlnet_aux():
    canny = annotator("canny")
    video = frames(1)
    ours = canny_hint(video, 50, 120)
    assert set(ours.unique().tolist()) == {0.0, 1.0}
    for image, hint in zip(to_uint8(video), ours, strict=True):
        theirs = canny.CannyDetector()(image, 50, 120, 64, 64, output_type="np")
        assert np.array_equal(hint.permute(1, 2, 0).numpy() * 255, theirs)
    with pytest.raises(ValueError, match="low < high"):
        canny_hint(video, 200, 100)


def test_depth_hint_is_near_bright_in_unit_range():
    depth = torch.linspace(2.0, 10.0, 16).view(1, 1, 4, 4).repeat(2, 1, 1, 1)  # inverse depth
    depth[1] *= 50
    hint = depth_hint(depth)
    assert hint.shape == (2, 3, 4, 4)
    assert torch.allclose(hint[0], hint[1], atol=1e-6)  # per image: any scale
    assert hint[0, :, 0, 0].eq(0).all() and hint[0, :, -1, -1].eq(1).all()  # far dark, near bright
