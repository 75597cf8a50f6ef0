"""infer.py's ``lora=[{file, weight}]``: merged for an SD file and a Gen-1 checkpoint, recorded in
the sidecar, weight 0 changing nothing, and a bad file one line before any compute."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.torch import save_file

import infer
from jobs.editing.request import InferError
from model.sd.loading import load_sd
from model.training.loading import load_gen1
from model.weights.atomic import file_sha256
from tests.lora_files import write_kohya_lora
from tests.sd_layout import ROOT
from tests.test_infer import config, read

TINY_SD = ROOT / "bundle" / "tiny_sd" / "tiny_sd.safetensors"
GEN1 = ROOT / "bundle" / "tiny_world" / "gen1_tiny_world.safetensors"
CLIP = ROOT / "bundle" / "tiny_world" / "samples" / "clip_a.mp4"
COMMON = [f"input={CLIP}", "end=2", "steps=2", "progress=false", "seed=1", "strength=0.7"]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    sd = load_sd(TINY_SD)
    gen1 = load_gen1(GEN1)
    write_kohya_lora(folder / "sd.safetensors", sd, seed=1)
    both = SimpleNamespace(unet=gen1.sampling_unet(), text_encoder=sd.text_encoder)
    write_kohya_lora(folder / "gen1.safetensors", both, seed=2)
    save_file(
        {"first_stage_model.x": sd.vae.encoder.conv_in.weight}, str(folder / "vae.safetensors")
    )
    return folder


def _sd(out, *extra):
    return infer.run(
        config(*COMMON, f"checkpoint={TINY_SD}", "prompt='a cyan box'", f"output={out}", *extra)
    )


def test_an_sd_edit_with_loras_records_them(loras, tmp_path):
    plain = _sd(tmp_path / "plain.mp4")
    assert plain["lora"] == []
    zero = _sd(tmp_path / "zero.mp4", f"lora=[{{file: {loras / 'sd.safetensors'}, weight: 0}}]")
    assert np.array_equal(read(tmp_path / "zero.mp4")[0], read(tmp_path / "plain.mp4")[0])
    outcome = _sd(
        tmp_path / "lora.mp4", f"lora=[{{file: {loras / 'sd.safetensors'}, weight: 0.8}}]"
    )
    assert not np.array_equal(read(tmp_path / "lora.mp4")[0], read(tmp_path / "plain.mp4")[0])
    (entry,) = outcome["lora"]
    assert entry["weight"] == 0.8 and entry["format"] == "kohya"
    assert entry["sha256"] == file_sha256(loras / "sd.safetensors")
    assert entry["parts"] == ["unet", "text"] and entry["skipped"] == []
    assert zero["lora"][0]["weight"] == 0.0


@pytest.mark.slow  # ~11 s; the SD path above covers infer's LoRA handling
def test_a_gen1_edit_takes_an_sd_loras_unet_part(loras, tmp_path):
    out = tmp_path / "gen1.mp4"
    outcome = infer.run(
        config(
            *COMMON, f"checkpoint={GEN1}", f"output={out}", f"lora=[{loras / 'gen1.safetensors'}]"
        )
    )
    (entry,) = outcome["lora"]
    assert entry["parts"] == ["unet"] and entry["skipped"] == ["text"] and entry["weight"] == 1.0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{file: missing.safetensors}", "LoRA file not found: missing.safetensors"),
        ("{file: LORAS/vae.safetensors, weight: 1}", "not a LoRA file"),
        ("{file: LORAS/sd.safetensors, weight: heavy}", "weight must be a number"),
        ("{path: LORAS/sd.safetensors}", "unknown keys: path"),
        ("{file: LORAS/gen1.safetensors}", "a delta of shape"),
    ],
)
def test_a_bad_lora_is_one_line_and_no_output(loras, tmp_path, entry, message):
    out = tmp_path / "bad.mp4"
    with pytest.raises(InferError, match=message) as err:
        _sd(out, f"lora=[{entry.replace('LORAS', str(loras))}]")
    assert "\n" not in str(err.value) and not out.exists()


def test_keyframed_lora_weights_give_each_frame_its_own(loras, tmp_path):
    """keyframes=[{frame: 0, lora: [0]}, {frame: 1, lora: [0.8]}] on two frames of an SD
    edit (frames do not mix in an SD UNet): frame 0 is the edit without the LoRA, frame 1
    the edit with it merged at 0.8; the sidecar records the schedule."""
    unet_only = write_kohya_lora(
        tmp_path / "unet.safetensors", load_sd(TINY_SD), seed=3, text=False
    )
    lora = f"lora=[{{file: {unet_only}, weight: 0.5}}]"
    plain = _sd(tmp_path / "plain.mp4")["result"].frames
    merged = _sd(tmp_path / "merged.mp4", f"lora=[{{file: {unet_only}, weight: 0.8}}]")
    keys = "keyframes=[{frame: 0, lora: [0]}, {frame: 1, lora: [0.8]}]"
    outcome = _sd(tmp_path / "keyed.mp4", lora, keys)
    frames = outcome["result"].frames
    np.testing.assert_allclose(frames[:, 0], plain[:, 0], atol=2e-3)
    np.testing.assert_allclose(frames[:, 1], merged["result"].frames[:, 1], atol=2e-3)
    assert not np.allclose(plain[:, 1], merged["result"].frames[:, 1], atol=2e-2)
    assert outcome["keyframes"]["schedule"]["lora.0"] == [0.0, 0.8]
    assert outcome["lora"][0]["weight"].startswith("keyframed")
    with pytest.raises(InferError, match="one per file"):
        _sd(tmp_path / "bad.mp4", lora, "keyframes=[{frame: 0, lora: [0, 1]}]")
