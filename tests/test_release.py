"""Release files: EMA UNet + frozen parts in fp16 with the config as JSON; loading never
unpickles or builds a class named in a file; a release and its checkpoint give one model."""

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import save_file

import release as release_cli
from jobs.training import build_model
from model.training.loading import load_gen1, release_from_checkpoint
from model.weights.checkpoint import CheckpointError, read_state_dict
from model.weights.release import (
    CONFIG_KEY,
    FORMAT,
    FORMAT_KEY,
    default_noise_correlation,
    read_release,
    read_training_checkpoint,
    sampling_default,
)
from tests.sd_layout import ROOT


def write_training_checkpoint(path: Path) -> Path:
    """A real Lightning checkpoint of the tiny Gen-1 (written by ``Trainer.save_checkpoint``).

    Its UNet's zero-initialised layers are randomised, so predictions depend on the weights,
    and its EMA copy is set apart from the trained weights, so a test can tell them apart.
    """
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["run_dir=unused", "model.depth=null"])  # no MiDaS
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        pairs = zip(model.unet.named_parameters(), model.ema.model.parameters(), strict=True)
        for (name, p), ema in pairs:
            if ".temporal." not in name and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            ema.copy_(p + torch.randn(p.shape, generator=gen) * 0.02)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_training_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.ckpt")


@pytest.fixture(scope="module")
def release(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "tiny.safetensors"
    release_from_checkpoint(checkpoint, path)
    return path


class Tripwire:
    """A class a malicious file could name; counts every construction and unpickling."""

    built = 0

    def __init__(self, *args, **kwargs):
        Tripwire.built += 1

    def __setstate__(self, state):
        Tripwire.built += 1


def test_release_holds_the_ema_unet_in_fp16_and_the_config_as_json(checkpoint, release):
    raw = torch.load(checkpoint, weights_only=True)["state_dict"]
    with safe_open(str(release), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert metadata[FORMAT_KEY] == FORMAT
    config = json.loads(metadata[CONFIG_KEY])
    assert "_target_" not in json.dumps(config)
    assert config["ema_decay"] is None and config["weights"] is None
    assert config["unet"]["in_channels"] == 5
    assert not any(k.startswith("ema.") for k in tensors)
    assert {k.split(".")[0] for k in tensors} == {"unet", "vae", "clip"}
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    for key, value in tensors.items():
        source = raw["ema.model." + key[len("unet.") :]] if key.startswith("unet.") else raw[key]
        assert torch.equal(value, source.to(value.dtype)), key
    out_weight = "unet.out.2.weight"
    assert not torch.allclose(tensors[out_weight].float(), raw[out_weight], atol=1e-3)


def test_a_release_and_its_checkpoint_build_the_same_model_within_fp16(checkpoint, release):
    from_release, from_ema = load_gen1(release), load_gen1(checkpoint)
    trained = load_gen1(checkpoint, use_ema=False)
    assert from_release.ema is None and from_ema.ema is None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 5, 8, 8, generator=gen)
    context = torch.randn(1, 1, 32, generator=gen)
    t = torch.tensor([300])
    with torch.no_grad():
        a, b, c = (m.unet(x, t, context) for m in (from_release, from_ema, trained))
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
    assert (b - c).abs().max() > 0.1 * b.abs().max()  # the EMA weights, not the trained ones


def test_a_release_naming_a_class_is_refused_and_nothing_is_built(release, tmp_path):
    config, state = read_release(release)
    evil = {**config, "unet": {**config["unet"], "_target_": f"{__name__}.Tripwire"}}
    bad = tmp_path / "evil.safetensors"
    metadata = {FORMAT_KEY: FORMAT, CONFIG_KEY: json.dumps(evil)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match="names a class"):
        load_gen1(bad)
    assert Tripwire.built == 0
    unknown = tmp_path / "unknown.safetensors"
    metadata[CONFIG_KEY] = json.dumps({**config, "loader": "os.system"})
    save_file({"x": torch.zeros(1)}, str(unknown), metadata=metadata)
    with pytest.raises(CheckpointError, match="unknown Gen1 config entries"):
        load_gen1(unknown)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(CheckpointError, match="not a Gen-1 release"):
        load_gen1(plain)


@dataclasses.dataclass
class CallbackState:
    """A dataclass a callback might keep in a checkpoint."""

    best: float = 0.5
    where: pathlib.Path = pathlib.Path("/runs/best.ckpt")


class ReducedWithArgs(Tripwire):
    """An object whose ``__reduce__`` passes constructor arguments."""

    def __reduce__(self):
        return (ReducedWithArgs, (1, "two", [3.0]), {"state": 4})


class RunsCode:
    """What a malicious file pickles: a call to os.system on load."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_objects_pickled_in_a_training_checkpoint_load_as_placeholders(checkpoint, tmp_path):
    data = torch.load(checkpoint, weights_only=True)
    data["callbacks"] = {
        "Tripwire": Tripwire(),
        "EarlyStopping": {"best_score": np.float64(0.25), "wait": np.int64(3)},
        "arrays": np.arange(4.0),
        "paths": [pathlib.PosixPath("a/b"), pathlib.Path("c")],
        "state": CallbackState(),
        "reduced": ReducedWithArgs(),
        "counts": collections.defaultdict(list, {"a": [1]}),
    }
    before = Tripwire.built
    tricked = tmp_path / "epoch=3-step=400.ckpt"
    torch.save(data, tricked)
    state, hparams = read_training_checkpoint(tricked)
    assert Tripwire.built == before  # nothing of the file's classes was built
    assert hparams["unet"]["in_channels"] == 5 and "unet.out.2.weight" in state
    assert release_cli.main([str(tricked), str(tmp_path / "r.safetensors")]) == 0
    assert load_gen1(tricked).unet is not None and Tripwire.built == before
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_training_checkpoint(ROOT / "pyproject.toml")


def test_a_checkpoint_that_calls_code_is_refused_naming_it_and_nothing_runs(checkpoint, tmp_path):
    marker = tmp_path / "ran"
    data = torch.load(checkpoint, weights_only=True)
    data["callbacks"] = {"x": RunsCode(marker)}
    evil = tmp_path / "evil.ckpt"
    torch.save(data, evil)
    for read in (read_training_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError, match=r"evil.ckpt: .*(posix|os)\.system"):
            read(evil)
    assert not marker.exists()


def test_release_cli_prints_the_sha256_of_what_it_wrote(checkpoint, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert release_cli.main([str(checkpoint), str(out)]) == 0
    digest, name = capsys.readouterr().out.split()
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest() and name == str(out)
    assert release_cli.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "m.safetensors")]) == 1
    assert release_cli.main([str(checkpoint), str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("release.py: error:") for line in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli.safetensors"]


def test_release_cli_sets_the_editing_defaults_the_release_carries(checkpoint, tmp_path, capsys):
    out = tmp_path / "defaults.safetensors"
    args = [str(checkpoint), str(out), "--sampling", "noise_correlation=0.5"]
    assert release_cli.main(args) == 0
    assert default_noise_correlation(out) == 0.5 and default_noise_correlation(checkpoint) == 0
    resolution = sampling_default(checkpoint, "resolution", None)
    assert resolution and sampling_default(out, "resolution", None) == resolution  # kept
    assert release_cli.main([*args[:2], "--sampling", "steps=4"]) == 1
    assert "KEY one of resolution, noise_correlation" in capsys.readouterr().err
