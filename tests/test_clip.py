"""open_clip embedders: same embeddings as open_clip's own encode_image / encode_text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms as T

from model.encoders.clip import TINY_CLIP_CONFIG, build_clip, clip_config, load_clip

PROMPTS = ["a red cube on a striped floor", "a blue sphere", ""]


def images(n: int = 3, h: int = 40, w: int = 57, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def open_clip_eval_transform(size: int) -> tuple[T.Resize, T.CenterCrop, T.Normalize]:
    """The tensor-capable steps of open_clip's own eval transform (default preprocess cfg)."""
    steps = open_clip.image_transform(size, is_train=False).transforms
    resize = next(t for t in steps if isinstance(t, T.Resize))
    crop = next(t for t in steps if isinstance(t, T.CenterCrop))
    normalize = next(t for t in steps if isinstance(t, T.Normalize))
    return resize, crop, normalize


def saved_reference(tmp_path: Path, cfg: dict) -> tuple[torch.nn.Module, Path]:
    """An open_clip model with random weights, and those weights as a .safetensors file."""
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg).eval()
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    return reference, path


def test_tiny_embeddings_equal_open_clip(tmp_path: Path) -> None:
    reference, path = saved_reference(tmp_path, TINY_CLIP_CONFIG)
    embedder = load_clip(path, "clip_tiny")
    x = images()
    resize, crop, normalize = open_clip_eval_transform(32)
    with torch.no_grad():
        expected_image = reference.encode_image(normalize(crop(resize((x + 1) / 2)).clamp(0, 1)))
        tokens = open_clip.get_tokenizer("ViT-L-14")(PROMPTS)
        expected_text = reference.encode_text(tokens)
    got_image, got_text = embedder.encode_image(x), embedder.encode_text(PROMPTS)
    assert got_image.shape == (3, 32) and got_text.shape == (3, 32)
    assert not got_image.is_inference() and not got_text.is_inference()
    torch.testing.assert_close(got_image, expected_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_text, expected_text, rtol=1e-5, atol=1e-5)
    normed = embedder.encode_image(x, normalize=True)
    torch.testing.assert_close(normed, torch.nn.functional.normalize(expected_image, dim=-1))


def test_config_dict_loads_like_its_name(tmp_path: Path) -> None:
    _, path = saved_reference(tmp_path, TINY_CLIP_CONFIG)
    by_name, by_dict = load_clip(path, "clip_tiny"), load_clip(path, dict(TINY_CLIP_CONFIG))
    x = images()
    torch.testing.assert_close(by_dict.encode_image(x), by_name.encode_image(x))


def test_video_frames_embed_per_frame() -> None:
    embedder = build_clip("clip_tiny")
    frames = images(6).view(2, 3, 3, 40, 57)
    torch.testing.assert_close(
        embedder.encode_image(frames), embedder.encode_image(frames.flatten(0, 1)).view(2, 3, 32)
    )


def test_preprocess_is_open_clips_transform_on_tensors() -> None:
    embedder = build_clip("clip_tiny")
    resize, crop, normalize = open_clip_eval_transform(32)
    for h, w in [(40, 57), (57, 40), (32, 32), (20, 25)]:
        x = images(2, h, w)
        expected = normalize(crop(resize((x + 1) / 2)).clamp(0, 1))
        torch.testing.assert_close(embedder.preprocess(x), expected)


def test_preprocess_close_to_open_clip_on_pil_images() -> None:
    """The PIL path (8-bit, PIL's bicubic) that CLIP was trained with agrees closely."""
    embedder = build_clip("clip_tiny")
    pixels = (torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(3)) * 255).round()
    pil = Image.fromarray(pixels.permute(1, 2, 0).numpy().astype(np.uint8))
    expected = open_clip.image_transform(32, is_train=False)(pil)
    got = embedder.preprocess(pixels[None] / 127.5 - 1)[0]
    assert (got - expected).abs().mean() < 0.01


def test_frozen_and_eval() -> None:
    embedder = build_clip("clip_tiny").train()
    assert not embedder.model.training
    assert not any(p.requires_grad for p in embedder.parameters())


def test_named_configs() -> None:
    assert clip_config("ViT-L-14-quickgelu")["quick_gelu"] is True
    assert clip_config("ViT-L-14-quickgelu")["embed_dim"] == 768
    assert clip_config("ViT-H-14")["embed_dim"] == 1024
    with pytest.raises(KeyError, match="unknown CLIP model"):
        clip_config("ViT-nope")


def test_missing_weights_error_names_key_file_and_model(tmp_path: Path) -> None:
    path = tmp_path / "clip.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        load_clip(path, "ViT-H-14", config_key="model.content.weights")
    message = str(err.value)
    assert message.startswith("model.content.weights:")
    assert "'ViT-H-14'" in message and str(path) in message and "SD 2.x" in message


@pytest.mark.slow
def test_named_open_clip_model_from_local_file(tmp_path: Path) -> None:
    """The open_clip-name path: create_model(name, pretrained=<local file>)."""
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    path = tmp_path / "vit_b_32.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    embedder = load_clip(path, "ViT-B-32-quickgelu")
    x = images(2, 224, 300)
    resize, crop, normalize = open_clip_eval_transform(224)
    with torch.no_grad():
        expected = reference.encode_image(normalize(crop(resize((x + 1) / 2)).clamp(0, 1)))
        expected_text = reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(PROMPTS))
    torch.testing.assert_close(embedder.encode_image(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(embedder.encode_text(PROMPTS), expected_text, rtol=1e-4, atol=1e-4)
