"""The tiny SD: ``train.py experiment=tiny_sd`` trains it, ``release.py --format sd`` writes it
as an SD single file with its yaml, and the bundled one loads (ours and diffusers'
``from_single_file``) and edits a bundled clip through the path a real SD 1.5 file takes."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import release
from data.media import read_frames
from jobs.training import build_model, train
from model.editing.pipeline import edit_video
from model.editing.settings import EditSettings
from model.encoders.clip import load_clip
from model.metrics.video import prompt_consistency
from model.sd.files import checkpoint_kind
from model.sd.loading import load_sd
from tests.sd_layout import ROOT

BUNDLE = ROOT / "bundle" / "tiny_sd"
TINY_SD = BUNDLE / "tiny_sd.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "clip_tiny.safetensors"
PROMPT = "a red striped sphere and a blue dotted box on a yellow checkered floor"
# captions of held-out world clips: the edit's prompt, and one it should not match
EDIT = "a white checkered sphere on a cyan checkered floor"
UNRELATED = "an orange striped box on a yellow dotted floor"


def tiny_sd_trainer(run_dir):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_sd", f"run_dir={run_dir}"])
    return build_model(cfg.model)


def test_the_trainers_state_is_an_sd_ckpt_and_releases_as_one(tmp_path):
    """SDTrainer keeps LDM's names (model.diffusion_model, first_stage_model,
    cond_stage_model.model, model_ema): its checkpoint loads as an SD .ckpt, EMA included."""
    module = tiny_sd_trainer(tmp_path)
    batch = {"frames": torch.rand(2, 1, 3, 64, 64) * 2 - 1, "caption": [PROMPT, "a cube"]}
    loss = module.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and module.model.diffusion_model.out[2].weight.grad is not None
    with torch.no_grad():
        module.model.diffusion_model.out[2].weight.add_(0.5)
    module.model_ema.update(module.model)  # the EMA copy now differs from the weights
    prefixes = {k.split(".")[0] for k in module.state_dict()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model", "model_ema"}
    checkpoint = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
               checkpoint)  # fmt: skip
    assert checkpoint_kind(checkpoint) == "sd"
    out = tmp_path / "tiny_sd.safetensors"
    assert release.main([str(checkpoint), str(out), "--format", "sd"]) == 0
    released = load_sd(out)
    averaged = load_sd(checkpoint, config=out.with_suffix(".yaml"), use_ema=True)
    trained = load_sd(checkpoint, config=out.with_suffix(".yaml"))
    key = "out.2.weight"
    ema = released.unet.state_dict()[key]
    assert torch.equal(ema, averaged.unet.state_dict()[key].half().float())
    assert not torch.equal(ema, trained.unet.state_dict()[key].half().float())
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "cond_stage_model"}
    assert released.config.clip_skip == 2 and released.config.text_arch == "clip_tiny"


@pytest.mark.slow
def test_train_py_trains_the_tiny_sd_and_release_writes_an_sd_file(tmp_path):
    overrides = [
        "experiment=tiny_sd",
        f"run_dir={tmp_path}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_clips=4",
        "data.num_frames=1",
        "data.val_clips=2",
        "data.datamodule.batch_size=4",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.progress",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    train(cfg)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint_kind(checkpoint) == "sd"  # LDM's key layout, EMA copies included
    out = tmp_path / "release" / "tiny.safetensors"
    assert release.main([str(checkpoint), str(out), "--format", "sd"]) == 0
    assert out.with_suffix(".yaml").is_file()
    released = load_sd(out)
    from_checkpoint = load_sd(checkpoint, config=out.with_suffix(".yaml"), use_ema=True)
    for (name, a), (_, b) in zip(
        released.state_dict().items(), from_checkpoint.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b.half().float(), msg=name, atol=0, rtol=0)
    tensors = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert {k.split(".")[0] for k in tensors} == {"model", "first_stage_model", "cond_stage_model"}


def test_the_bundled_tiny_sd_is_small_and_documented():
    assert TINY_SD.stat().st_size <= 10 * 10**6
    assert sum(f.stat().st_size for f in (ROOT / "bundle").rglob("*") if f.is_file()) < 60 * 10**6
    card = (BUNDLE / "CARD.md").read_text()
    assert "## How it was made" in card and "held-out" in card


def test_the_bundled_tiny_sd_loads_as_sd_and_in_diffusers():
    import diffusers
    from diffusers.loaders import single_file_utils as single_file

    assert checkpoint_kind(TINY_SD) == "sd"
    model = load_sd(TINY_SD)  # its yaml beside it, as A1111 finds one
    assert model.config.text_kind == "sd2" and model.config.clip_skip == 2
    assert model.config.native_resolution == 64 and model.parameterization == "eps"
    assert sum(p.numel() for p in model.unet.parameters()) < 3e6
    yaml_path = TINY_SD.with_suffix(".yaml")
    unet = diffusers.UNet2DConditionModel.from_single_file(
        TINY_SD, original_config=str(yaml_path), local_files_only=True
    )
    state = load_file(str(TINY_SD))
    expected = single_file.convert_ldm_unet_checkpoint(state, dict(unet.config))
    got = unet.state_dict()
    assert set(got) == set(expected)  # no key missing, none left at its random init
    assert all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in got)
    vae = diffusers.AutoencoderKL.from_single_file(
        TINY_SD, original_config=str(yaml_path), local_files_only=True
    )
    assert set(vae.state_dict()) == set(single_file.convert_ldm_vae_checkpoint(state, vae.config))


def test_the_text_tower_is_the_tiny_clips():
    """The bundled file's SD 2.x text encoder is the tiny CLIP's text tower: its last layer,
    pooled at the end token and projected, is open_clip's own text embedding."""
    model = load_sd(TINY_SD)
    clip = load_clip(CLIP, "clip_tiny")
    encoder = model.text_encoder
    encoder.clip_skip = 1
    tokens = encoder.tokenize([PROMPT, "a cube"])
    hidden = encoder(tokens)
    pooled = hidden[torch.arange(2), tokens.argmax(dim=-1)] @ encoder.text_projection
    torch.testing.assert_close(pooled, clip.encode_text([PROMPT, "a cube"]), atol=2e-3, rtol=1e-2)


@torch.no_grad()
def test_the_bundled_tiny_sd_edits_a_bundled_clip_from_a_prompt():
    model = load_sd(TINY_SD)
    frames = read_frames(ROOT / "bundle" / "tiny_world" / "samples" / "clip_a.mp4", list(range(4)),
                         (64, 64))  # fmt: skip
    settings = EditSettings(steps=8, strength=0.75, sampler="dpmpp_2m", w=5.0)

    def edit(seed: int):
        generator = torch.Generator().manual_seed(seed)
        prompt = model.encode_prompt(EDIT, "")
        return edit_video(model, frames, prompt, settings, generator=generator)

    result = edit(0)
    assert result.method == "mov2mov" and result.frames.shape == frames.shape
    assert torch.equal(result.frames, edit(0).frames)  # a seed reproduces it
    assert (result.frames - frames).abs().mean() > 0.02  # it changed the clip
    clip = load_clip(CLIP, "clip_tiny")  # Gen-1's prompt consistency, by the tiny CLIP
    edited = prompt_consistency(clip, result.frames[0], EDIT)
    assert edited > prompt_consistency(clip, frames[0], EDIT) + 0.3  # moved toward the prompt
    assert edited > prompt_consistency(clip, result.frames[0], UNRELATED) + 0.3
