"""Staged training: the video stage starts from the image stage's UNet; the EMA warms up and
resumes; checkpoints carry their native resolution; the tiny world's stages compose."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from model.nets.unet import UNet
from model.training.ema import EMA
from model.training.gen1 import load_stage_unet
from model.training.loading import release_from_checkpoint
from model.weights.checkpoint import CheckpointError
from model.weights.release import native_resolution, read_model_config
from tests.sd_layout import ROOT, config
from tests.test_release import write_training_checkpoint


@pytest.fixture(scope="module")
def image_stage(tmp_path_factory):
    """A training checkpoint of the tiny Gen-1 (trained and EMA weights set apart)."""
    return write_training_checkpoint(tmp_path_factory.mktemp("stage") / "image.ckpt")


def video_unet(**overrides) -> UNet:
    params = {**config("unet", "tiny"), "in_channels": 5, "temporal": True, "content_dim": 32}
    return UNet(**{**params, **overrides})


def test_the_video_stage_takes_the_image_stages_ema_unet(image_stage, tmp_path):
    state = torch.load(image_stage, map_location="cpu", weights_only=True)["state_dict"]
    ema = {k[len("ema.model.") :]: v for k, v in state.items() if k.startswith("ema.model.")}
    release = tmp_path / "image.safetensors"
    release_from_checkpoint(image_stage, release)
    for source in (image_stage, release):
        unet = video_unet()
        fresh = {k: v.clone() for k, v in unet.state_dict().items()}
        report = load_stage_unet(unet, str(source))
        loaded = unet.state_dict()
        for key, value in ema.items():  # every image-stage weight, from the EMA copy
            torch.testing.assert_close(loaded[key], value.float(), atol=1e-3, rtol=1e-3)
        assert report.initialised == [] or all(".temporal." in k for k in report.initialised)
        for key in report.initialised:
            assert torch.equal(loaded[key], fresh[key])


def test_an_image_stage_of_another_shape_is_refused(image_stage):
    with pytest.raises(CheckpointError, match="image.ckpt.*wrong shapes"):
        load_stage_unet(video_unet(model_channels=64), str(image_stage))


def test_the_ema_warms_up_and_its_count_resumes():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    for _ in range(5):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(6 / 15)
    resumed = EMA(model, decay=0.999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.current_decay() == ema.current_decay()
    assert EMA(model, decay=0.999, warmup=False).current_decay() == 0.999


def test_checkpoints_carry_their_native_resolution(image_stage, tmp_path):
    assert native_resolution(image_stage) == 64  # configs/model/tiny.yaml: sampling.resolution
    release = tmp_path / "r.safetensors"
    release_from_checkpoint(image_stage, release)
    assert read_model_config(release)["sampling"] == {"resolution": 64}
    assert native_resolution(release) == 64


@pytest.mark.parametrize("experiment", ["tiny_world_image", "tiny_world_video"])
def test_the_tiny_world_stages_compose(experiment):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=unused", f"experiment={experiment}"])
    assert cfg.model.vae.ddconfig.norm_groups == 8
    assert cfg.model.sampling.resolution == cfg.data.size == 64
    datamodule = cfg.data.datamodule
    if experiment == "tiny_world_image":
        assert datamodule.train_dataset.single_frames and datamodule.image_ratio == 0
        assert cfg.callbacks.validation_samples is None
    else:
        assert cfg.model.weights.unet.endswith("image/checkpoints/last.ckpt")
        assert datamodule.image_dataset.single_frames and datamodule.image_ratio > 0
