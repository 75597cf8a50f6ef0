"""Training end to end: every config group builds, the loss falls, resume is exact,
bad videos are skipped, and DDP runs on two CPU processes."""

import csv
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from data.datamodule import JointBatchSampler, JointDataset
from data.datasets import SkippedMediaWarning, VideoClipDataset
from jobs.editing.run import run
from jobs.training import ConfigError, build_model, build_trainer, check_config, setup, train
from tests.sd_layout import ROOT

# A very small world so that a few dozen steps take seconds on two CPU cores.
SMALL = [
    "experiment=tiny",
    "data.datamodule.train_dataset.size=32",
    "data.datamodule.train_dataset.num_frames=4",
    "data.datamodule.image_dataset.size=32",
    "data.datamodule.val_dataset.size=32",
    "data.datamodule.val_dataset.num_frames=4",
    "data.datamodule.batch_size=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
]


def config(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[f"run_dir={run_dir}", *overrides])


def logged(run_dir: Path, name: str) -> list[float]:
    """Values of a metric from the CSV logger, in step order."""
    (metrics,) = run_dir.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.parametrize("name", ["tiny", "sd15", "sd21", "sd2_depth"])
def test_model_configs_build(tmp_path, name):
    cfg = config(tmp_path, f"model={name}")
    if name == "tiny":
        model = build_model(cfg.model)
        assert model.unet.in_channels == 5 and model.unet.temporal
        return
    # Full size: UNet, VAE and MiDaS as layouts only (open_clip cannot build on meta).
    cfg = config(tmp_path, f"model={name}", "model.clip.model=clip_tiny")
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.unet.in_channels == 5
    assert model.hparams.parameterization == ("v" if name == "sd21" else "eps")


@pytest.mark.parametrize("name", ["cpu", "gpu", "ddp", "fsdp"])
def test_trainer_configs_compose_and_cpu_ones_build(tmp_path, name):
    cfg = config(tmp_path, f"trainer={name}")
    assert cfg.trainer.use_distributed_sampler is False
    if name in ("cpu", "ddp"):
        overrides = ["trainer.accelerator=cpu", "trainer.devices=1"] if name == "ddp" else []
        trainer = build_trainer(config(tmp_path, f"trainer={name}", *overrides))
        assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_callbacks_and_loggers_build(tmp_path, logger):
    cfg = config(tmp_path, f"logger={logger}")
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)
    (built,) = [instantiate(c) for c in cfg.logger.values()]
    assert str(tmp_path) in built.save_dir


def test_data_configs_build(tmp_path, video_folder):
    synthetic = instantiate(config(tmp_path).data.datamodule)
    assert len(synthetic.train_dataset) > 0 and synthetic.image_ratio > 0
    videos = instantiate(
        config(tmp_path, "data=videos", f"data.root={video_folder}").data.datamodule
    )
    assert len(videos.train_dataset) == 4
    joint = config(
        tmp_path,
        "data=images_and_videos",
        f"data.root={video_folder}",
        f"data.image_root={video_folder}",
    )
    assert joint.data.datamodule.image_ratio > 0


def test_tiny_training_loss_falls(tmp_path):
    cfg = config(
        tmp_path,
        *SMALL,
        "trainer.max_steps=60",
        "trainer.limit_val_batches=0",
        "model.warmup_steps=5",
    )
    train(cfg)
    losses = logged(tmp_path, "train/loss")
    assert len(losses) >= 40
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    """Stopped at step 4 (an epoch boundary) and resumed to 8 = straight to 8."""
    common = [
        *SMALL,
        "data.datamodule.train_dataset.num_clips=4",
        "data.datamodule.image_ratio=0",
        "trainer.limit_val_batches=0",
    ]
    straight = train(config(tmp_path / "a", *common, "trainer.max_steps=8"))
    train(config(tmp_path / "b", *common, "trainer.max_steps=4"))
    resumed = train(config(tmp_path / "b", *common, "trainer.max_steps=8", "ckpt_path=last"))
    assert resumed.global_step == straight.global_step == 8
    a, b = straight.lightning_module.state_dict(), resumed.lightning_module.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    first = train(config(tmp_path / "c", *common, "trainer.max_steps=4")).lightning_module
    assert not torch.equal(first.unet.out[2].weight, straight.lightning_module.unet.out[2].weight)


def image_folder(root: Path) -> Path:
    """Four small PNG images of gradients."""
    root.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, 40, dtype=np.float32)
    for n in range(4):
        pixels = np.stack([np.add.outer(ramp, ramp * n / 4) / 2] * 3, -1).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"image{n}.png")
    return root


REAL = [
    "experiment=tiny",
    "data.datamodule.train_dataset.size=32",
    "data.datamodule.train_dataset.num_frames=2",
    "data.datamodule.train_dataset.stride=1",
    "data.datamodule.pin_memory=false",
    "data.datamodule.batch_size=2",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.progress",
    "callbacks.checkpoint.every_n_train_steps=3",
]


@pytest.mark.parametrize(
    "data",
    [
        ["data=videos", "data.datamodule.num_workers=0"],
        ["data=videos", "data.datamodule.num_workers=2"],
        [
            "data=images_and_videos",
            "data.image_root={images}",
            "data.datamodule.num_workers=0",
            "data.datamodule.image_dataset.size=32",
            "data.datamodule.image_ratio=0.5",
        ],
    ],
    ids=["videos", "videos-2-workers", "images_and_videos"],
)
def test_resume_on_real_files_is_exact(tmp_path, video_folder, data):
    """Clip starts and crops are drawn from (seed, step, sample): 3 + 3 steps equal 6 straight
    on a folder of real clips (the crops of the resumed run used to repeat the first run's)."""
    images = image_folder(tmp_path / "images")
    data = [d.format(images=images) for d in data]
    common = [*REAL, *data, f"data.root={video_folder}"]
    straight = train(config(tmp_path / "a", *common, "trainer.max_steps=6")).lightning_module
    train(config(tmp_path / "b", *common, "trainer.max_steps=3"))
    resumed = train(config(tmp_path / "b", *common, "trainer.max_steps=6", "ckpt_path=last"))
    a, b = straight.state_dict(), resumed.lightning_module.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_batch_k_draws_the_same_crops_whatever_came_before(video_folder):
    """The sampler hands every sample a seed of (seed, step, place); the dataset's random start
    and crop come from it, not from the process's RNG state."""
    dataset = VideoClipDataset(root=str(video_folder), num_frames=4, size=32, stride=1)
    sampler = JointBatchSampler(len(dataset), 0, batch_size=2, seed=5, with_seeds=True)
    later = JointBatchSampler(len(dataset), 0, batch_size=2, seed=5, with_seeds=True, start_step=3)
    batches = list(itertools.islice(iter(sampler), 5))
    assert list(itertools.islice(iter(later), 2)) == batches[3:5]
    joint = JointDataset([dataset])
    torch.manual_seed(0)
    first = [joint[key]["key"] for key in batches[3]]
    torch.manual_seed(123)  # another global RNG state: the same samples
    assert [joint[key]["key"] for key in batches[3]] == first
    assert len({joint[key]["key"] for batch in batches for key in batch}) > 2  # they do vary


def test_configs_that_cannot_work_are_refused_before_any_work(tmp_path, video_folder):
    no_depth = config(
        tmp_path, "experiment=tiny", "data=videos", f"data.root={video_folder}", "model.depth=null"
    )
    with pytest.raises(ConfigError, match=r"model.depth is null.*carries no depth"):
        check_config(no_depth)
    with pytest.raises(ConfigError, match="exactly one of root= or manifest="):
        check_config(config(tmp_path, "experiment=tiny", "data=videos"))
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        check_config(config(tmp_path, "data=videos", f"data.root={tmp_path / 'nowhere'}"))
    check_config(config(tmp_path, "experiment=tiny", "data=videos", f"data.root={video_folder}"))
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=tiny", "data=videos", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "train.py: error: data.datamodule.train_dataset needs exactly one of root= or "
        "manifest= (data.root=DIR or data.manifest=FILE.csv|jsonl)"
    ]


def test_videos_with_corrupt_and_empty_files_train_and_report(tmp_path, video_folder):
    cfg = config(
        tmp_path,
        "experiment=tiny",
        "data=videos",
        f"data.root={video_folder}",
        "data.datamodule.train_dataset.size=32",
        "data.datamodule.train_dataset.num_frames=4",
        "data.datamodule.train_dataset.stride=1",
        "data.datamodule.num_workers=0",
        "data.datamodule.pin_memory=false",
        "data.datamodule.batch_size=2",
        "trainer.max_steps=4",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress",
    )
    with pytest.warns(UserWarning, match="corrupt.mp4"):
        trainer = train(cfg)
    assert trainer.global_step == 4
    skipped = trainer.datamodule.skipped_files()
    assert sorted(Path(p).name for p in skipped) == ["corrupt.mp4", "empty.mp4"]
    # Its checkpoint edits a video with no other overrides (the bundled tiny MiDaS inside).
    out = tmp_path / "edited.mp4"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "infer",
            overrides=[
                f"input={video_folder / 'good0.mp4'}",
                f"output={out}",
                f"checkpoint={tmp_path / 'checkpoints' / 'last.ckpt'}",
                "steps=2",
                "max_frames=2",
                "progress=false",
            ],
        )
    assert run(cfg)["frames"]["count"] == 2 and out.is_file()


@pytest.mark.parametrize("trainable", ["all", pytest.param("temporal", marks=pytest.mark.slow)])
def test_ddp_with_joint_batches_equals_one_process(tmp_path, trainable):
    """Two gloo processes with image and video batches (find_unused_parameters=False) give
    the weights one process gives with the same global batch: every sample draws from (seed,
    step, place in the global batch), image steps tie the temporal layers in with zero weight
    and then drop those zero gradients (AdamW would move them), and with trainable=temporal
    image steps are skipped on every rank."""
    common = [
        *SMALL,
        "data.datamodule.image_ratio=0.5",
        f"model.trainable={trainable}",
        "model.weight_decay=0.01",
        "trainer.max_steps=6",
        "trainer.limit_val_batches=0",
    ]
    ddp = [
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "data.datamodule.batch_size=1",
        f"hydra.run.dir={tmp_path / 'ddp'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "train.py", *ddp], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "finished at step 6" in out.stderr + out.stdout
    kinds = ["train/loss_video"] + (["train/loss_image"] if trainable == "all" else [])
    assert all(logged(tmp_path / "ddp", kind) for kind in kinds)  # both kinds of batch ran
    one = train(config(tmp_path / "one", *common, "data.datamodule.batch_size=2"))
    single = one.lightning_module.state_dict()
    checkpoint = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    distributed = checkpoint["state_dict"]
    assert distributed.keys() == single.keys()
    # AdamW divides by sqrt(v) + 1e-8: where a gradient is near zero (a temporal layer's after
    # one video step), summing it in another order moves a weight by up to ~2e-5 here. Keeping
    # the image steps' zero gradients moves the temporal layers by 1e-4 to 3e-4 (measured).
    for key, value in single.items():
        torch.testing.assert_close(distributed[key], value, atol=1e-4, rtol=1e-4, msg=key)
    moved = [k for k, v in single.items() if "temporal" in k and k.startswith("unet.")]
    assert moved and any(not torch.equal(single[k], one.lightning_module.ema.model.state_dict()[
        k[len("unet."):]]) for k in moved)  # fmt: skip


def test_validation_writes_a_sampled_clip(tmp_path):
    import decord

    cfg = config(
        tmp_path,
        *SMALL,
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "callbacks.validation_samples.steps=2",
    )
    trainer = train(cfg)
    (sampler,) = [c for c in trainer.callbacks if type(c).__name__ == "ValidationSamples"]
    assert [p.name for p in sampler.written] == ["step_0000002.mp4"]
    video = decord.VideoReader(str(sampler.written[0]))
    assert len(video) == 4 and video[0].shape == (32, 64, 3)  # input | output, 4 frames


def test_data_that_gives_no_sample_is_one_line_before_training(tmp_path, video_folder):
    """Clips of 24 frames cannot give 8 frames at stride 4 (29 needed): refused when the run
    is set up, naming the data and the keys to change, not in a DataLoader worker."""
    cfg = config(
        tmp_path, "experiment=tiny", "data=videos", f"data.root={video_folder}",
        "data.num_frames=8", "data.stride=4", "data.size=32",
        "data.datamodule.num_workers=0", "data.datamodule.pin_memory=false",
    )  # fmt: skip
    with pytest.warns(SkippedMediaWarning), pytest.raises(ConfigError) as err:
        setup(cfg)
    message = str(err.value)
    assert "too_short" in message and "data.stride" in message and "\n" not in message
    cfg.data.stride = 2  # 15 frames: the two good clips give samples
    with pytest.warns(SkippedMediaWarning):
        setup(cfg)
