"""Shared pytest fixtures: CPU only, small real media files written by the tests."""

from pathlib import Path

import pytest
import torch

from data.io import write_video


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """Prepack calibrations (``model.weights.calibration``) go to a temporary cache directory,
    never the user's (subprocesses inherit it)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("GEN1_CACHE_DIR", str(tmp_path_factory.mktemp("gen1-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def video_folder(tmp_path_factory) -> Path:
    """Two good 24-frame mp4s of moving gradients, a corrupt one and a zero-byte one."""
    folder = tmp_path_factory.mktemp("videos")
    ramp = torch.linspace(-1, 1, 48)
    for n in range(2):
        frames = torch.stack(
            [
                torch.stack(
                    [
                        ramp.roll(3 * i + n)[None, :].expand(48, 48),
                        ramp.roll(2 * i)[:, None].expand(48, 48),
                        torch.full((48, 48), 0.5 * n - 0.25),
                    ]
                )
                for i in range(24)
            ]
        )
        write_video(folder / f"good{n}.mp4", frames, fps=12)
    (folder / "corrupt.mp4").write_bytes(bytes(range(256)) * 64)
    (folder / "empty.mp4").write_bytes(b"")
    return folder
