"""MiDaS networks: official key layouts, loading, parity with the original code, video wrapper."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from model.encoders.depth import (
    MIDAS_CONFIGS,
    SD_DEPTH_PREFIX,
    DepthEstimator,
    build_midas,
    infer_midas_name,
    load_midas,
    midas_input_size,
)
from tests.sd_layout import reference_keys

OFFICIAL = ["dpt_large_384", "dpt_hybrid_384", "midas_v21_small_256"]
PARAMS_M = {"dpt_large_384": 344.06, "dpt_hybrid_384": 123.15, "midas_v21_small_256": 21.39}


def reference_layout(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from the reference list of an official MiDaS checkpoint."""
    return reference_keys(f"midas_{name}")


def meta_model(name: str) -> nn.Module:
    with torch.device("meta"):
        return build_midas(name)


def numbered_state_dict(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A state dict with the layout whose tensor i is filled with i (stride-0 views: tiny files)."""
    sd = {}
    for i, (key, shape) in enumerate(layout.items()):
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(i)
        else:
            sd[key] = torch.full((), float(i)).expand(shape)
    return sd


def assert_numbered(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys; each tensor has the shape and the fill (its number) of its twin in the file."""
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        got = loaded[key]
        assert got.shape == value.shape, key
        assert got[(0,) * got.ndim] == value[(0,) * value.ndim], key


def random_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every float tensor random: weights, norm scales and biases, BN running statistics.

    The last conv's weights are made positive so the final ReLU keeps every output pixel
    (its input is post-ReLU): the comparison then covers the whole depth map.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            sd[key] = value.clone()
        elif key.endswith("running_var") or (value.ndim == 1 and key.endswith("weight")):
            sd[key] = torch.rand(value.shape, generator=g) + 0.5
        elif value.ndim <= 1:
            sd[key] = torch.randn(value.shape, generator=g) * 0.1
        else:
            sd[key] = torch.randn(value.shape, generator=g) / math.sqrt(value[0].numel())
    sd["scratch.output_conv.4.weight"] = sd["scratch.output_conv.4.weight"].abs()
    return sd


def assert_parity(official: nn.Module, name: str, size: tuple[int, int]) -> None:
    """Same random weights into the official model and ours; same input; same depth.

    Both are built on the meta device (no random init to pay for) and take the same tensors.
    """
    official.eval()
    sd = random_state_dict(official)
    official.load_state_dict(sd, strict=True, assign=True)
    ours = meta_model(name)
    ours.load_state_dict(sd, strict=True, assign=True)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = official(x), ours(x)
    assert got.shape == expected.shape == (2, *size)
    assert (expected > 0).float().mean() > 0.9 and expected.std() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.parametrize("name", OFFICIAL)
def test_layout_equals_official_checkpoint(name: str) -> None:
    model = meta_model(name)
    layout = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert layout == reference_layout(name)
    floats = sum(v.numel() for k, v in model.state_dict().items() if v.is_floating_point())
    assert round(floats / 1e6, 2) == PARAMS_M[name]


@pytest.mark.parametrize("name", OFFICIAL)
def test_official_file_loads_strictly(name: str, tmp_path: Path) -> None:
    sd = numbered_state_dict(reference_layout(name))
    path = tmp_path / MIDAS_CONFIGS[name].file
    torch.save(sd, path)
    for model in (load_midas(path, name), load_midas(path)):  # named, and inferred from keys
        assert model.name == name and not model.training
        assert_numbered(model.state_dict(), sd)
        assert not any(p.requires_grad for p in model.parameters())


def test_sd2_depth_checkpoint_loads_midas_part(tmp_path: Path) -> None:
    midas = numbered_state_dict(reference_layout("dpt_hybrid_384"))
    full = {SD_DEPTH_PREFIX + k: v for k, v in midas.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 5, 3, 3)
    full["first_stage_model.encoder.conv_in.weight"] = torch.zeros(128, 3, 3, 3)
    path = tmp_path / "512-depth-ema.ckpt"
    torch.save({"state_dict": full, "global_step": 1}, path)
    model = load_midas(path)
    assert model.name == "dpt_hybrid_384"
    assert_numbered(model.state_dict(), midas)


def test_tiny_round_trip_and_name_inference(tmp_path: Path) -> None:
    model = build_midas("midas_tiny")
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    path = tmp_path / "midas_tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_midas(path)
    assert loaded.name == "midas_tiny"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert infer_midas_name(model.state_dict()) == "midas_tiny"


def test_config_overrides() -> None:
    model = build_midas("midas_tiny", features=8)
    assert model.config.features == 8 and model.scratch.layer1_rn.out_channels == 8
    assert model.scratch.layer4_rn.out_channels == 64  # the small decoder doubles per level
    with pytest.raises(KeyError, match="unknown MiDaS model"):
        build_midas("dpt_giant")


def test_missing_file_error_names_key_file_and_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_midas(path, "dpt_hybrid_384", config_key="structure.depth_weights")
    message = str(err.value)
    assert message.startswith("structure.depth_weights:")
    assert "'dpt_hybrid_384.pt'" in message and str(path) in message and "DPT-Hybrid" in message


def test_wrong_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(build_midas("midas_tiny").state_dict(), path)
    with pytest.raises(RuntimeError, match="not a midas_v21_small_256 MiDaS checkpoint"):
        load_midas(path, "midas_v21_small_256")
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="matches no MiDaS layout"):
        load_midas(path)


def test_parity_small_with_original_midas(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ldm.modules.midas.midas.midas_net_custom")
    from ldm.modules.midas.midas import blocks
    from ldm.modules.midas.midas.midas_net_custom import MidasNet_small

    def offline_lite3(use_pretrained: bool, exportable: bool = False) -> nn.Module:
        # NOTES.md: timm's tf_efficientnet_lite3 with act1 = Identity stands in exactly for
        # the torch.hub gen-efficientnet backbone (timm's bn1 applies the activation).
        net = timm.create_model("tf_efficientnet_lite3", pretrained=False)
        net.act1 = nn.Identity()
        return blocks._make_efficientnet_backbone(net)

    monkeypatch.setattr(blocks, "_make_pretrained_efficientnet_lite3", offline_lite3)
    with torch.device("meta"):
        official = MidasNet_small(
            None, features=64, backbone="efficientnet_lite3", blocks={"expand": True}
        )
    assert_parity(official, "midas_v21_small_256", (96, 128))


def test_parity_dpt_hybrid_with_original_midas() -> None:
    pytest.importorskip("ldm.modules.midas.midas.dpt_depth")
    from ldm.modules.midas.midas.dpt_depth import DPTDepthModel

    with pytest.warns(UserWarning, match="deprecated model name"), torch.device("meta"):
        official = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    assert_parity(official, "dpt_hybrid_384", (64, 96))  # pos-embed grid resized 24 -> 4x6


@pytest.mark.slow
def test_parity_dpt_large_with_original_midas() -> None:
    pytest.importorskip("ldm.modules.midas.midas.dpt_depth")
    from ldm.modules.midas.midas.dpt_depth import DPTDepthModel

    with torch.device("meta"):
        official = DPTDepthModel(path=None, backbone="vitl16_384", non_negative=True)
    assert_parity(official, "dpt_large_384", (64, 96))


@pytest.mark.parametrize(
    ("name", "frame", "expected"),
    [
        # Worked by hand through the official Resize(keep_aspect_ratio, multiple of 32).
        ("dpt_hybrid_384", (1080, 1920), (384, 672)),  # "minimal": scale 384/1080
        ("dpt_large_384", (480, 640), (384, 512)),
        ("dpt_large_384", (256, 256), (384, 384)),
        ("midas_v21_small_256", (1080, 1920), (128, 256)),  # "upper_bound": 144 rounds to 128
        ("midas_v21_small_256", (480, 640), (192, 256)),
    ],
)
def test_input_size_follows_official_transform(name, frame, expected) -> None:
    assert midas_input_size(*frame, MIDAS_CONFIGS[name]) == expected


def test_depth_estimator_on_video() -> None:
    net = build_midas("midas_tiny")
    frames = torch.rand(2, 5, 3, 40, 56, generator=torch.Generator().manual_seed(0)) * 2 - 1
    depth = DepthEstimator(net, chunk_size=3)(frames)
    assert depth.shape == (2, 5, 1, 40, 56) and not depth.is_inference()
    torch.testing.assert_close(DepthEstimator(net, chunk_size=100)(frames), depth)

    # Frame (1, 2) by hand: [0, 1] pixels, bicubic to 32x64 (fits 64x64, x32), ImageNet norm.
    x = F.interpolate((frames[1, 2:3] + 1) / 2, size=(32, 64), mode="bicubic")
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((x - mean) / std)[:, None]
    expected = F.interpolate(expected, size=(40, 56), mode="bicubic")
    torch.testing.assert_close(depth[1, 2:3], expected)


def test_network_rejects_sizes_not_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        build_midas("midas_tiny")(torch.zeros(1, 3, 48, 64))


def test_a_midas_without_weights_is_the_same_in_every_run():
    """Random stand-in weights are drawn from a fixed seed (edits with them repeat) and
    leave the global generator as it was."""
    from model.encoders.frozen import build_depth

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = build_depth({"name": "midas_tiny", "weights": None})
    assert torch.equal(torch.rand(1), before)
    second = build_depth({"name": "midas_tiny", "weights": None})
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
