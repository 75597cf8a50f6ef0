"""The cache of encoded clips: what it stores, when it rebuilds, and that training on it is
the same as training on the clips themselves."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

import data.encoded as encoded
from data.datamodule import collate_samples
from data.encoded import EncodedClipDataset
from data.synthetic import SyntheticWorldDataset
from model.diffusion.loss import training_loss
from model.encoders.clip import build_clip
from model.training.gen1 import Gen1
from tests.sd_layout import ROOT

SOURCE = {
    "_target_": "data.synthetic.SyntheticWorldDataset",
    "num_clips": 3,
    "num_frames": 4,
    "size": 32,
    "split": "val",
}


def tiny_model_config(tmp_path) -> dict:
    """The tiny Gen-1 config with its VAE and CLIP weights in files (random, seeded)."""
    model = yaml.safe_load((ROOT / "configs/model/tiny.yaml").read_text())
    model.pop("defaults")
    model["vae"] = yaml.safe_load((ROOT / "configs/model/vae/tiny.yaml").read_text())
    model["unet"] = {
        **yaml.safe_load((ROOT / "configs/model/unet/tiny.yaml").read_text()),
        **model["unet"],
    }
    model["seed"] = 0
    torch.manual_seed(0)
    gen1 = Gen1(**{k: v for k, v in model.items() if k != "_target_"})
    save_file(gen1.vae.state_dict(), tmp_path / "vae.safetensors")
    clip = build_clip("clip_tiny")
    save_file(clip.model.state_dict(), tmp_path / "clip.safetensors")
    model["weights"] = {"vae": str(tmp_path / "vae.safetensors")}
    model["clip"]["weights"] = str(tmp_path / "clip.safetensors")
    return model


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    return tiny_model_config(tmp_path_factory.mktemp("weights"))


def dataset(model_config, path, **kwargs) -> EncodedClipDataset:
    return EncodedClipDataset(
        source=kwargs.pop("source", SOURCE),
        path=str(path),
        vae=model_config["vae"],
        vae_weights=model_config["weights"]["vae"],
        clip=model_config["clip"],
        depth=None,
        progress=False,
        **kwargs,
    )


def test_the_cache_holds_the_encoders_outputs(model_config, tmp_path):
    cached = dataset(model_config, tmp_path / "cache.safetensors")
    assert len(cached) == 3
    world = SyntheticWorldDataset(**{k: v for k, v in SOURCE.items() if k != "_target_"})
    gen1 = Gen1(**{k: v for k, v in model_config.items() if k != "_target_"}).eval()
    for index in (0, 2):
        sample, clip = cached[index], world[index]
        assert sample["is_video"] and sample["caption"] == clip["caption"]
        assert (sample["frames"] - clip["frames"]).abs().max() <= 1 / 127.5 + 1e-6
        assert torch.equal(sample["depth"], clip["depth"].half().float())
        mean, logvar = gen1.vae.moments(clip["frames"])
        torch.testing.assert_close(sample["latent_mean"], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sample["latent_logvar"], logvar, atol=1e-5, rtol=1e-5)
        content = gen1.clip.encode_image(clip["frames"])
        torch.testing.assert_close(sample["content"], content, atol=1e-5, rtol=1e-5)


def test_a_matching_cache_loads_and_a_changed_source_rebuilds(model_config, tmp_path, monkeypatch):
    path = tmp_path / "cache.safetensors"
    first = dataset(model_config, path)
    calls = []
    real = encoded.encode_dataset
    monkeypatch.setattr(encoded, "encode_dataset", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = dataset(model_config, path)
    assert calls == [] and torch.equal(again[1]["latent_mean"], first[1]["latent_mean"])
    changed = dataset(model_config, path, source={**SOURCE, "num_clips": 2})
    assert calls == [1] and len(changed) == 2
    path.write_bytes(b"truncated")
    dataset(model_config, path)
    assert calls == [1, 1]


def test_single_frames_serve_every_frame_as_an_image(model_config, tmp_path):
    clips = dataset(model_config, tmp_path / "cache.safetensors")
    images = dataset(model_config, tmp_path / "cache.safetensors", single_frames=True)
    assert len(images) == 12
    image = images[5]  # clip 1, frame 1
    assert not image["is_video"] and image["frames"].shape == (1, 3, 32, 32)
    assert torch.equal(image["latent_mean"][0], clips[1]["latent_mean"][1])
    with pytest.raises(IndexError):
        images[12]


def test_training_on_the_cache_equals_training_on_the_clips(model_config, tmp_path):
    """Same generator: the cached batch gives the loss that encoding on the fly gives."""
    cached = dataset(model_config, tmp_path / "cache.safetensors")
    world = SyntheticWorldDataset(**{k: v for k, v in SOURCE.items() if k != "_target_"})
    gen1 = Gen1(**{k: v for k, v in model_config.items() if k != "_target_"})
    batch_cached = collate_samples([cached[0], cached[1]])
    batch_frames = collate_samples([world[0], world[1]])
    batch_frames["frames"] = batch_cached["frames"]  # the cache's 8-bit frames
    batch_frames["depth"] = batch_cached["depth"]
    losses = [
        gen1.loss(batch, gen1.unet, torch.Generator().manual_seed(3))[0]
        for batch in (batch_cached, batch_frames)
    ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)


def test_noise_correlation_trains_clips_on_correlated_frame_noise(
    model_config, tmp_path, monkeypatch
):
    """Video batches get frame noise with a per-clip shared part; single frames are untouched."""
    import model.training.gen1 as gen1_module

    seen = []

    def capture(model_fn, latents, *args, noise=None, **kwargs):
        seen.append(noise)
        return training_loss(model_fn, latents, *args, noise=noise, **kwargs)

    monkeypatch.setattr(gen1_module, "training_loss", capture)
    clips = dataset(model_config, tmp_path / "cache.safetensors")
    params = {k: v for k, v in model_config.items() if k != "_target_"}
    gen1 = Gen1(**{**params, "noise_correlation": 1.0})
    gen1.loss(collate_samples([clips[0], clips[1]]), gen1.unet, torch.Generator().manual_seed(4))
    noise = seen[-1]
    assert noise is not None and noise.shape[1] > 1
    for sample in noise:  # each clip's frames correlate (c ~ U(0, 1), not 0 and not 1)
        corr = torch.corrcoef(sample.flatten(1))[0, 1:]
        assert 0.2 < corr.mean() < 0.99  # seeded draws: 0.58 and 0.70 here
    images = dataset(model_config, tmp_path / "cache.safetensors", single_frames=True)
    gen1.loss(collate_samples([images[0], images[1]]), gen1.unet, torch.Generator().manual_seed(4))
    assert seen[-1].shape[1] == 1  # one frame: nothing to correlate, plain Gaussian noise
