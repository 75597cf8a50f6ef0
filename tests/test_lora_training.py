"""``train.py experiment=tiny_lora data.root=DIR`` trains a LoRA of the tiny SD on a few images
and writes it in kohya's format; merged back into the base it is the trained UNet, exactly."""

from __future__ import annotations

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open

from jobs.training import train
from model.sd.loading import load_sd
from model.sd.lora import merge_loras, read_lora
from tests.sd_layout import ROOT


def test_train_py_writes_a_kohya_lora_that_merges_into_the_trained_unet(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = np.full((64, 64, 3), (230, 120, 170), np.uint8)
        pixels[rng.integers(0, 48) :, :, :] = rng.integers(0, 255, 3)  # a floor line
        Image.fromarray(pixels).save(images / f"{i}.png")
    run_dir = tmp_path / "run"
    overrides = ["experiment=tiny_lora", f"data.root={images}", f"run_dir={run_dir}"]
    overrides += ["trainer.max_steps=3", "data.datamodule.batch_size=2", "model.rank=2"]
    overrides += ["model.lr=0.01", "~callbacks.progress", "~callbacks.checkpoint"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = train(cfg).lightning_module
    path = run_dir / "lora.safetensors"
    lora = read_lora(path)
    assert lora.format == "kohya" and lora.parts() == ["unet"]
    assert all(
        p.key.startswith("lora_unet_") and p.rank == 2 and p.alpha == 4.0 for p in lora.pairs
    )
    assert any("_attn2_to_k" in p.key for p in lora.pairs)  # diffusers' names, kohya's way
    assert any(p.up.abs().max() > 0 for p in lora.pairs)  # it trained
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_num_train_images"] == "3"
    assert meta["ss_steps"] == "3"

    base = load_sd(ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors")
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([50, 900])
    context = module.context.expand(2, -1, -1)
    with torch.no_grad():
        trained = module.sd.unet.eval()(x, t, context)
        plain = base.unet(x, t, context)
        with merge_loras([(path, 1.0)], base.unet, base.text_encoder):
            merged = base.unet(x, t, context)
    assert torch.equal(merged, trained) and not torch.equal(plain, trained)
