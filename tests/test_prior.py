"""The text -> image-embedding prior: training through train.py, seeded sampling, the file
round trip and its errors, the caption-embedding cache, and infer.py's prompt path."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
from data.captions import CaptionEmbeddingDataModule, CaptionEmbeddingDataset
from data.io import write_video
from data.synthetic import SyntheticWorldDataset
from jobs.editing import models
from jobs.editing.request import InferError
from jobs.training import train
from model.editing.content import text_content
from model.encoders.clip import load_clip
from model.encoders.prior import Prior, export_prior, load_prior, prior_function
from model.training.prior_training import evaluate_prior
from model.weights.checkpoint import CheckpointError
from release import export_component
from tests.sd_layout import ROOT

CLIP = {"model": "clip_tiny", "weights": str(ROOT / "bundle/tiny_world/clip_tiny.safetensors")}
WORLD = {"_target_": "data.synthetic.SyntheticWorldDataset", "num_frames": 2, "size": 32}


def small_prior(seed: int = 0) -> Prior:
    """A small prior with image statistics of random embeddings."""
    torch.manual_seed(seed)
    prior = Prior(32, width=32, depth=1, heads=2).eval()
    prior.set_image_stats(torch.randn(64, 32) * 3 + 1)
    return prior


def train_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"run_dir={tmp_path}",
                "experiment=tiny_prior",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.num_clips=96",
                "data.val_clips=16",
                "data.size=32",
                "data.datamodule.batch_size=32",
                "model.prior.width=32",
                "model.prior.depth=1",
                "model.prior.heads=2",
                "model.warmup_steps=5",
                "model.val_steps=4",
                "trainer.max_steps=40",
                "trainer.val_check_interval=40",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                "~callbacks.progress",
                *overrides,
            ],
        )


def logged(run_dir: Path, name: str) -> list[float]:
    (metrics,) = run_dir.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_train_py_trains_the_prior_and_its_export_loads(tmp_path):
    trainer = train(train_config(tmp_path))
    assert trainer.global_step == 40
    losses = logged(tmp_path, "train/loss")
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert -1 <= logged(tmp_path, "val/cos_prior")[-1] <= 1
    assert 0.5 < logged(tmp_path, "val/cos_text")[-1] < 1  # the trained tiny CLIP's pairs
    module = trainer.lightning_module
    assert bool(module.prior.has_stats)
    path = module.export(tmp_path / "prior.safetensors")
    loaded = load_prior(path)
    assert json.loads(json.dumps(loaded.config)) == loaded.config
    state = module.prior.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    # release.py exports the same file from the Lightning checkpoint.
    export_component(
        str(tmp_path / "checkpoints/last.ckpt"), str(tmp_path / "cli.safetensors"), "prior"
    )
    a, b = load_file(path), load_file(tmp_path / "cli.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sampling_is_reproducible_from_a_seed():
    prior, text = small_prior(), torch.randn(3, 32)
    a = prior_function(prior, seed=1, steps=8)(text)
    assert a.shape == (3, 32)
    assert torch.equal(a, prior_function(prior, seed=1, steps=8)(text))
    assert not torch.allclose(a, prior_function(prior, seed=2, steps=8)(text))
    assert torch.allclose(a.norm(dim=-1), prior.image_norm.expand(3))  # the raw CLIP scale
    stochastic = prior_function(prior, seed=1, sampler="euler_a", steps=8)
    assert torch.equal(stochastic(text), stochastic(text))
    best = prior.sample(text, generator=torch.Generator().manual_seed(0), num_candidates=3)
    assert best.shape == (3, 32)


def test_text_content_takes_the_prior():
    class Gen1Stub:
        clip = load_clip(CLIP["weights"], "clip_tiny")

    fn = prior_function(small_prior(), seed=4, steps=4)
    content = text_content(Gen1Stub(), ["a red sphere on a blue dotted floor"], "prior", fn)
    assert content.shape == (1, 1, 32)
    assert torch.equal(
        content[:, 0], fn(Gen1Stub.clip.encode_text(["a red sphere on a blue dotted floor"]))
    )


def test_export_load_round_trip_and_errors(tmp_path):
    prior = small_prior()
    path = export_prior(prior, tmp_path / "p.safetensors", {"note": "x"})
    loaded = load_prior(path)
    text = torch.randn(2, 32)
    gen = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert torch.equal(
        prior.sample(text, generator=gen[0], steps=4),
        loaded.sample(text, generator=gen[1], steps=4),
    )
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        load_prior(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="not a prior file"):
        load_prior(CLIP["weights"])
    (tmp_path / "junk.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_prior(tmp_path / "junk.safetensors")
    state = load_file(path)
    del state["out.weight"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*out\.weight"):
        load_prior(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="no image statistics"):
        export_prior(Prior(32, width=32, depth=1, heads=2), tmp_path / "untrained.safetensors")


def test_evaluate_reports_the_prior_and_text_cosines():
    prior, text = small_prior(), torch.randn(6, 32)
    images = torch.randn(6, 32)
    out = evaluate_prior(prior, text, images, steps=4, batch_size=4)
    assert out["count"] == 6
    assert out["cos_text"] == pytest.approx(float(F.cosine_similarity(text, images).mean()))
    assert out["cos_gain"] == pytest.approx(out["cos_prior"] - out["cos_text"])


def test_world_cache_is_reused_by_key_and_rebuilt_when_it_changes(tmp_path):
    path = tmp_path / "pairs.safetensors"
    source = {**WORLD, "num_clips": 3, "split": "val"}
    first = CaptionEmbeddingDataset(source, str(path), CLIP, progress=False)
    assert first.rebuilt and len(first) == 6  # every frame of every clip is a pair
    world = SyntheticWorldDataset(num_clips=3, num_frames=2, size=32, split="val")
    clip = load_clip(CLIP["weights"], "clip_tiny")
    sample = world[1]
    assert torch.allclose(first[2]["image_embedding"], clip.encode_image(sample["frames"])[0])
    assert torch.allclose(first[3]["text_embedding"], clip.encode_text([sample["caption"]])[0])
    assert first[3]["caption"] == sample["caption"]
    again = CaptionEmbeddingDataset(source, str(path), CLIP, progress=False)
    assert not again.rebuilt and torch.equal(again.image, first.image)
    more = CaptionEmbeddingDataset({**source, "num_clips": 4}, str(path), CLIP, progress=False)
    assert more.rebuilt and len(more) == 8
    random_clip = {"model": "clip_tiny", "weights": None}
    other = CaptionEmbeddingDataset(
        {**source, "num_clips": 4}, str(path), random_clip, progress=False
    )
    assert other.rebuilt and not torch.allclose(other.image, more.image)


def test_image_folder_captions_and_held_out_split(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)]):
        Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(folder / f"{i}.png")
        if i < 3:  # image 3 has no caption: skipped
            (folder / f"{i}.txt").write_text(f"a picture number {i}\n")
    source = {"_target_": "data.datasets.ImageDataset", "root": str(folder), "size": 32}
    source["train"] = False
    path = tmp_path / "cache.safetensors"
    pairs = CaptionEmbeddingDataset(source, str(path), CLIP, progress=False)
    assert pairs.captions == ["a picture number 0", "a picture number 1", "a picture number 2"]
    (folder / "1.txt").write_text("a green picture\n")  # edited files change the key
    pairs = CaptionEmbeddingDataset(source, str(path), CLIP, progress=False)
    assert pairs.rebuilt and pairs.captions[1] == "a green picture"
    data = CaptionEmbeddingDataModule(pairs, val_fraction=0.34, batch_size=2)
    assert len(data.train_dataset) == 2 and len(data.val_dataset) == 1
    assert data.train_image_embeddings().shape == (2, 32)
    batch = next(iter(data.train_dataloader()))
    assert batch["image_embedding"].shape == (2, 32) and len(batch["caption"]) == 2


def infer_config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=list(overrides))


@pytest.mark.parametrize(
    ("prior", "message"), [(None, "none is configured"), ("missing.safetensors", "no such prior")]
)
def test_infer_prompt_without_a_prior_file_is_one_clear_line(prior, message, tmp_path, capfd):
    from tests.test_release import write_training_checkpoint

    # A real Gen-1 checkpoint: its kind decides that a prompt goes through the prior.
    write_training_checkpoint(tmp_path / "tiny.ckpt")
    args = [f"input={tmp_path}/in.mp4", f"output={tmp_path}/out.mp4"]
    args += [f"checkpoint={tmp_path}/tiny.ckpt"]
    args += ["prompt=a red box", f"prior={tmp_path}/{prior}" if prior else "prior=null"]
    assert infer.cli(infer_config(*args)) == 1
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "prior" in err
    assert not (tmp_path / "out.mp4").exists()


def test_infer_loads_the_prior_and_refuses_a_wrong_one(tmp_path):
    path = export_prior(small_prior(), tmp_path / "p.safetensors")
    cfg = infer_config("input=x.mp4", "output=y.mp4", "checkpoint=c", f"prior={path}")
    text = torch.randn(1, 32)
    fn = models.prompt_prior(cfg, 32, "cpu", seed=7)
    assert torch.equal(fn(text), prior_function(small_prior(), seed=7, num_candidates=2)(text))
    with pytest.raises(InferError, match="another CLIP"):
        models.prompt_prior(cfg, 768, "cpu", seed=7)
    bad = infer_config("input=x.mp4", "output=y.mp4", "checkpoint=c", f"prior={CLIP['weights']}")
    with pytest.raises(InferError, match="not a prior file"):
        models.prompt_prior(bad, 32, "cpu", seed=7)


def test_infer_edits_a_video_from_a_prompt_through_the_prior(tmp_path):
    from tests.test_release import write_training_checkpoint

    frames = torch.linspace(-1, 1, 32)[None, None, None, :].expand(4, 3, 32, 32).clone()
    write_video(tmp_path / "in.mp4", frames, fps=8)
    write_training_checkpoint(tmp_path / "tiny.ckpt")
    prior = export_prior(small_prior(), tmp_path / "p.safetensors")
    common = [f"input={tmp_path}/in.mp4", f"checkpoint={tmp_path}/tiny.ckpt", "prompt=a red box"]
    common += ["resolution=32", "size_multiple=32", "steps=2", "w=3", "progress=false", "seed=3"]
    common += ["window.length=4", "window.overlap=1", "midas.name=midas_tiny"]
    a = infer.run(infer_config(*common, f"output={tmp_path}/a.mp4", f"prior={prior}"))
    b = infer.run(infer_config(*common, f"output={tmp_path}/b.mp4", "prompt_mode=direct"))
    assert a["settings"]["prior"] == str(prior) and (tmp_path / "a.mp4").is_file()
    assert (a["result"].frames - b["result"].frames).abs().mean() > 1e-3
