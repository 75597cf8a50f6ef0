"""``train.py experiment=tiny_lora data.root=DIR`` trains a LoRA of the tiny SD on a few images
and writes it in kohya's format; merged back into the base it is the trained UNet, exactly.
``release.py --format lora`` writes the same file from a training checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors import safe_open

import release
from jobs.training import train
from model.sd.loading import load_sd
from model.sd.lora import merge_loras, read_lora
from model.training.lora_training import LoraTrainer
from tests.sd_layout import ROOT

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"


@pytest.mark.slow  # ~40 s: Lightning's setup around 3 steps
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
    overrides += ["model.alpha=4.0"]
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

    base = load_sd(TINY_SD)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([50, 900])
    context = module.context.expand(2, -1, -1)
    with torch.no_grad():
        trained = module.sd.unet.eval()(x, t, context)
        plain = base.unet(x, t, context)
        with merge_loras([(path, 1.0)], base.unet, base.text_encoder):
            merged = base.unet(x, t, context)
    assert torch.equal(merged, trained) and not torch.equal(plain, trained)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A rank-2 ``LoraTrainer`` of the tiny SD with random ``up`` weights (as if trained), and
    its Lightning-style checkpoint at step 7."""
    module = LoraTrainer(base=str(TINY_SD), instance_prompt="a sks object", rank=2, alpha=4.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in module.lora_layers().values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=gen) * 0.05)
    path = tmp_path_factory.mktemp("lora_ckpt") / "last.ckpt"
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**state, "global_step": 7}, path)
    return module, path


def test_release_format_lora_writes_the_checkpoints_lora_in_kohya_format(trained, tmp_path):
    module, checkpoint = trained
    out = tmp_path / "lora.safetensors"
    assert release.main([str(checkpoint), str(out), "--format", "lora"]) == 0
    lora = read_lora(out)
    assert lora.format == "kohya" and lora.parts() == ["unet"]
    assert len(lora.pairs) == len(module.adapted) and all(p.rank == 2 for p in lora.pairs)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "7" and meta["ss_network_dim"] == "2"
    base = load_sd(TINY_SD)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([50, 900])
    context = module.context.expand(2, -1, -1)
    with torch.no_grad():
        trained_out = module.sd.unet.eval()(x, t, context)
        with merge_loras([(out, 1.0)], base.unet, base.text_encoder):
            merged = base.unet(x, t, context)
        assert not torch.equal(base.unet(x, t, context), trained_out)
    assert torch.equal(merged, trained_out)


def test_release_format_lora_refuses_other_checkpoints_in_one_line(trained, tmp_path, capsys):
    module, checkpoint = trained
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hyper_parameters": {}}, other)
    assert release.main([str(other), str(tmp_path / "a.safetensors"), "--format", "lora"]) == 1
    assert "not a LoraTrainer checkpoint" in capsys.readouterr().err
    moved = tmp_path / "moved.ckpt"
    hparams = {**dict(module.hparams), "base": str(tmp_path / "gone.safetensors")}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, moved)
    assert release.main([str(moved), str(tmp_path / "b.safetensors"), "--format", "lora"]) == 1
    err = capsys.readouterr().err
    assert "gone.safetensors (model.base) not found" in err and err.count("\n") == 1
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
