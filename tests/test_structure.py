"""Clip-level structure: normalisation over the whole clip, latent resize, t_s blur."""

from __future__ import annotations

import pytest
import torch

from model.encoders.structure import blur_structure, clip_structure


def random_depth(b: int = 2, f: int = 6, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 1, h, w, generator=g) * torch.rand(b, f, 1, 1, 1, generator=g) * 10


@pytest.mark.parametrize("t_s", [0, 3, torch.tensor([1, 4])])
def test_reversed_clip_gives_reversed_structure(t_s) -> None:
    depth = random_depth()
    forward = clip_structure(depth, (5, 7), t_s)
    backward = clip_structure(depth.flip(1), (5, 7), t_s)
    assert forward.shape == (2, 6, 1, 5, 7)
    torch.testing.assert_close(backward, forward.flip(1), rtol=0, atol=1e-6)


def test_normalised_over_the_clip_not_per_frame() -> None:
    depth = torch.zeros(1, 2, 1, 16, 16)
    depth[0, 0, 0, :, 8:] = 1.0  # a flat frame: its own range is [0, 1]
    depth[0, 1, 0, :, 8:] = 10.0  # a deep frame: the clip's range is [0, 10]
    s = clip_structure(depth, (4, 4))
    assert s.min() == -1 and s.max() == 1
    assert s[0, 0].min() == -1 and torch.isclose(s[0, 0].max(), torch.tensor(-0.8))
    # Each clip of a batch has its own range.
    batch = torch.cat([depth, depth * 3 + 5])
    torch.testing.assert_close(clip_structure(batch, (4, 4)), torch.cat([s, s]))


def test_downsampling_averages_each_latent_cell() -> None:
    depth = random_depth(1, 2, 16, 24)
    s = clip_structure(depth, (2, 3))
    means = depth.view(1, 2, 1, 2, 8, 3, 8).mean(dim=(4, 6))
    expected = 2 * (means - means.min()) / (means.max() - means.min()) - 1
    torch.testing.assert_close(s, expected)


def test_constant_clip_gives_zero_structure() -> None:
    s = clip_structure(torch.full((1, 3, 1, 8, 8), 4.0), (4, 4), 2)
    assert torch.equal(s, torch.zeros(1, 3, 1, 4, 4))


def test_higher_t_s_strictly_removes_high_frequency_energy() -> None:
    depth = random_depth(1, 3, 64, 64)
    fy = torch.fft.fftfreq(32).abs().view(-1, 1)
    fx = torch.fft.fftfreq(32).abs().view(1, -1)
    high = (fy > 0.125) | (fx > 0.125)  # above a quarter of the band, either axis

    def high_energy(t_s: int) -> float:
        s = clip_structure(depth, (32, 32), t_s)
        return float((torch.fft.fft2(s).abs() ** 2)[..., high].sum())

    energies = [high_energy(t) for t in range(8)]
    assert energies[0] > 0
    assert all(a > b for a, b in zip(energies, energies[1:], strict=False)), energies
    assert energies[7] < 1e-3 * energies[0]


def test_per_sample_t_s_equals_each_sample_alone() -> None:
    depth = random_depth(3, 4, 32, 32)
    t_s = torch.tensor([0, 2, 5])
    batch = clip_structure(depth, (16, 16), t_s)
    for i, t in enumerate(t_s.tolist()):
        alone = clip_structure(depth[i : i + 1], (16, 16), t)
        torch.testing.assert_close(batch[i : i + 1], alone)
    assert torch.equal(batch[0], clip_structure(depth[:1], (16, 16))[0])  # t_s = 0 is no blur


def test_blur_keeps_range_and_rejects_negative_t_s() -> None:
    s = clip_structure(random_depth(), (8, 8))
    blurred = blur_structure(s, 4)
    assert blurred.min() >= -1 and blurred.max() <= 1
    with pytest.raises(ValueError, match="t_s must be >= 0"):
        blur_structure(s, torch.tensor([1, -1]))
