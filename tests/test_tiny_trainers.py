"""The VAE, depth and CLIP trainers: through ``train.train`` their loss falls on a tiny
world, and each export loads strictly with the project's loader and computes what the
trained module computes (also when exported from the Lightning checkpoint)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from data.synthetic import SyntheticWorldDataset
from jobs.training import train
from model.encoders.clip import load_clip
from model.encoders.depth import DepthEstimator, load_midas
from model.encoders.structure import align_scale_shift
from model.nets.autoencoder import AutoencoderKL
from model.training.components import (
    ClipTrainer,
    DepthTrainer,
    VAETrainer,
    contrastive_loss,
    retrieval_top1,
)
from model.weights.checkpoint import load_sd_vae
from tests.sd_layout import ROOT

# A world of 32x32 frames with few clips, so a few dozen steps visibly fit it.
QUIET = [
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
    "trainer.limit_val_batches=1",
]
WORLD = [
    "data.datamodule.train_dataset.size=32",
    "data.datamodule.train_dataset.num_frames=1",
    "data.datamodule.val_dataset.size=32",
    "data.datamodule.val_dataset.num_clips=8",
    "data.datamodule.val_batch_size=8",
]
RUNS = {
    "vae": [
        "data.datamodule.train_dataset.num_clips=8",
        "data.datamodule.batch_size=4",
        "model.crop_size=null",
        "model.lr=3e-3",
        "model.warmup_steps=5",
        "trainer.max_steps=40",
    ],
    "depth": [
        "data.datamodule.train_dataset.num_clips=8",
        "data.datamodule.batch_size=4",
        "model.warmup_steps=5",
        "trainer.max_steps=30",
    ],
    "clip": [
        "data.datamodule.train_dataset.num_clips=16",
        "data.datamodule.batch_size=16",
        "model.lr=2e-3",
        "model.warmup_steps=5",
        "trainer.max_steps=40",
    ],
}
TRAIN_METRIC = {"vae": "train/rec", "depth": "train/loss", "clip": "train/loss"}
VAL_METRICS = {
    "vae": ["val/psnr", "val/latent_std", "val/scale_factor"],
    "depth": ["val/ssi_mse", "val/corr"],
    "clip": ["val/top1_text_to_image", "val/top1_image_to_text"],
}
CLASSES = {"vae": VAETrainer, "depth": DepthTrainer, "clip": ClipTrainer}
TINY_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
}


def logged(run_dir: Path, name: str) -> list[float]:
    """Values of a metric from the CSV logger, in step order."""
    (metrics,) = run_dir.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    """(name, finished trainer, run dir) of a short training run of one trainer."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(name)
    steps = next(int(o.split("=")[1]) for o in RUNS[name] if o.startswith("trainer.max_steps"))
    overrides = [f"experiment=tiny_{name}", *QUIET, *WORLD, *RUNS[name]]
    overrides += [f"trainer.val_check_interval={steps}", f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread beats two busy shared cores
    try:
        return name, train(cfg), run_dir
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world_batch() -> dict:
    """Held-out frames, captions and exact depth of the tiny world."""
    world = SyntheticWorldDataset(num_clips=4, num_frames=2, size=32, split="test")
    samples = [world[i] for i in range(4)]
    return {
        "frames": torch.stack([s["frames"] for s in samples]),
        "depth": torch.stack([s["depth"] for s in samples]),
        "caption": [s["caption"] for s in samples],
    }


def test_loss_falls_and_validation_logs(run):
    name, trainer, run_dir = run
    assert isinstance(trainer.lightning_module, CLASSES[name])
    assert trainer.global_step == int(trainer.max_steps)
    losses = logged(run_dir, TRAIN_METRIC[name])
    assert len(losses) >= 25
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (name, first, last)
    for metric in VAL_METRICS[name]:
        (value,) = logged(run_dir, metric)
        assert math.isfinite(value), metric
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def exported_outputs(name: str, path: Path, batch: dict, vae_cfg: dict) -> tuple[torch.Tensor, ...]:
    """Outputs of the exported file, loaded (strictly) by the project's own loader."""
    images = batch["frames"].flatten(0, 1)
    if name == "vae":
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if k != "_target_"})
        report = load_sd_vae(vae, path)
        assert report.loaded == len(vae.state_dict())
        mean, _ = vae.moments(images)
        return mean, vae.decode_unscaled(mean)
    if name == "depth":
        estimator = DepthEstimator(load_midas(path, "midas_tiny"))
        return (estimator.net(estimator.preprocess(images)),)
    embedder = load_clip(path, "clip_tiny")
    return embedder.encode_image(images[::2], True), embedder.encode_text(batch["caption"], True)


@torch.no_grad()
def module_outputs(name: str, module, batch: dict) -> tuple[torch.Tensor, ...]:
    """The same outputs, computed by the trained LightningModule."""
    module.eval()
    images = batch["frames"].flatten(0, 1)
    if name == "vae":
        mean, _ = module.vae.moments(images)
        return mean, module.vae.decode_unscaled(mean)
    if name == "depth":
        return (module.net(module.preprocess(images)),)
    return module.embed(images[::2], batch["caption"])


def test_export_loads_strictly_and_computes_the_same(run, world_batch, tmp_path):
    name, trainer, run_dir = run
    module = trainer.lightning_module
    path = module.export(tmp_path / f"{name}.safetensors")
    expected = module_outputs(name, module, world_batch)
    for got, want in zip(
        exported_outputs(name, path, world_batch, module.hparams.get("vae")), expected, strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if name == "vae":  # the latent std measured in validation travels as metadata
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        assert float(meta["scale_factor"]) == pytest.approx(1 / module.latent_std, rel=1e-5)
        (logged_std,) = logged(run_dir, "val/latent_std")
        assert module.latent_std == pytest.approx(logged_std, rel=1e-5)

    # Exported again from the Lightning checkpoint: the very same tensors.
    restored = CLASSES[name].load_from_checkpoint(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    again = restored.export(tmp_path / f"{name}_from_ckpt.pt")
    first = dict(torch.load(again, weights_only=True))
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(first)
        for key in first:
            assert torch.equal(f.get_tensor(key), first[key]), key
    if name == "vae":
        assert restored.latent_std == module.latent_std


def test_depth_preprocess_matches_the_depth_estimator(world_batch):
    trainer = DepthTrainer()
    estimator = DepthEstimator(trainer.net)
    images = world_batch["frames"].flatten(0, 1)
    torch.testing.assert_close(trainer.preprocess(images), estimator.preprocess(images))


def test_scale_shift_alignment_is_exact_and_safe_for_constants():
    target = torch.rand(3, 8, 8)
    prediction = 0.5 * target - 2.0
    prediction[2] = 7.0  # a constant prediction: no scale to fit, the mean is the best shift
    aligned = align_scale_shift(prediction, target)
    torch.testing.assert_close(aligned[:2], target[:2])
    torch.testing.assert_close(aligned[2], target[2].mean().expand(8, 8))


def test_contrastive_loss_and_retrieval_with_twin_captions():
    scale = torch.tensor(100.0)
    matched = contrastive_loss(torch.eye(4), torch.eye(4), scale)
    assert matched < 1e-3
    assert contrastive_loss(torch.eye(4), torch.eye(4)[[1, 0, 2, 3]], scale) > 10 + matched
    # Clips 2 and 3 share a caption, hence a text embedding; at best both images match it.
    images = texts = torch.eye(4)[[0, 1, 2, 2]]
    captions = ["a", "b", "c", "c"]
    # A twin costs ln 2 in each of its two rows, in both directions: (2 ln 2) / 4 on average.
    assert contrastive_loss(images, texts, scale) == pytest.approx(0.5 * math.log(2), rel=1e-3)
    # Text 3 retrieves image 2 (the first of the tie): its caption, so a hit.
    assert retrieval_top1(texts, images, captions) == 1.0
    assert retrieval_top1(texts, images, ["a", "b", "c", "d"]) == 0.75


def test_vae_crops_are_windows_of_each_image():
    trainer = VAETrainer({"embed_dim": 4, "ddconfig": TINY_DDCONFIG}, crop_size=8)
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    crops = trainer.crop(images, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 8, 8)
    for image, crop in zip(images, crops, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 16)  # values index positions
        assert torch.equal(crop, image[:, top : top + 8, left : left + 8])
    with pytest.raises(ValueError, match="crop_size"):  # fits the height, not the width
        trainer.crop(images[..., :6], torch.Generator())
