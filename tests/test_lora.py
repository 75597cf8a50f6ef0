"""LoRA files (kohya and diffusers / PEFT) merged into our SD models equal diffusers'
``load_lora_weights`` + ``fuse_lora`` on the same random weights; merging is undone exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from model.nets.unet import UNet
from model.sd.loading import load_sd
from model.sd.lora import merge_loras, read_lora
from model.weights.checkpoint import CheckpointError
from tests.lora_files import write_kohya_lora, write_peft_lora
from tests.sd_files import tiny_config, write_tiny_sd
from tests.sd_layout import config

PROMPTS = ["a red striped sphere", ""]


def _outputs(model, pipe=None):
    """(UNet output, text hidden states) of ours, or of diffusers' pipeline."""
    gen = torch.Generator().manual_seed(1)
    width = model.text_encoder.config.width  # the tiny configs' context_dim
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, width, generator=gen)
    ids = model.text_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        if pipe is None:
            return model.unet(x, t, ctx), model.text_encoder(ids)
        return (
            pipe.unet(x, t, encoder_hidden_states=ctx).sample,
            pipe.text_encoder(ids)[0],
        )


def _setup(tmp_path, kind):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.sd_files import diffusers_pipeline

    config_ = tiny_config(kind)
    path, state = write_tiny_sd(tmp_path, "base.safetensors", config_, seed=3)
    model = load_sd(path)
    pipe = diffusers_pipeline(state, config_, diffusers.DDIMScheduler(), tmp_path / "tok")
    return model, pipe


def _check_parity(model, pipe, lora, weight, before):
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_loras([(lora, weight)], model.unet, model.text_encoder)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.fuse_lora(lora_scale=weight)
    ours, theirs = _outputs(model), _outputs(model, pipe)
    for a, b, old in zip(ours, theirs, before, strict=True):
        assert (a - old).abs().max() > 1e-2  # the LoRA changes the outputs noticeably
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert merged.applied[0]["parts"] == ["unet", "text"]
    merged.restore()
    assert all(torch.equal(v, originals[k]) for k, v in model.state_dict().items())
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_merged_outputs_equal_diffusers_fuse_lora(tmp_path, kind):
    """kohya (LoCon convs, per-layer ranks; SD 2.x: q/k/v onto in_proj rows) and, for SD 1.x,
    a PEFT file with adapter metadata: UNet output and text hidden states equal diffusers'."""
    model, pipe = _setup(tmp_path, kind)
    before = _outputs(model)
    for ours, theirs in zip(before, _outputs(model, pipe), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    kohya = write_kohya_lora(tmp_path / "kohya.safetensors", model, seed=5)
    _check_parity(model, pipe, kohya, 0.8 if kind == "sd1" else 1.3, before)
    if kind == "sd1":
        peft = write_peft_lora(tmp_path / "peft.safetensors", model, seed=6)
        _check_parity(model, pipe, peft, 0.6, before)


def test_ldm_names_and_several_files_and_weight_zero(tmp_path):
    path, _ = write_tiny_sd(tmp_path, "base.safetensors", tiny_config("sd1"), seed=3)
    model = load_sd(path)
    a = write_kohya_lora(tmp_path / "a.safetensors", model, seed=1)
    a_ldm = write_kohya_lora(tmp_path / "a_ldm.safetensors", model, seed=1, ldm_names=True)
    b = write_peft_lora(tmp_path / "b.safetensors", model, seed=2)
    base = _outputs(model)
    with merge_loras([(a, 0.7)], model.unet, model.text_encoder):
        diffusers_names = _outputs(model)
    with merge_loras([(a_ldm, 0.7)], model.unet, model.text_encoder):
        ldm_names = _outputs(model)
    for x, y in zip(diffusers_names, ldm_names, strict=True):
        assert torch.equal(x, y)
    with merge_loras([(a, 0.0)], model.unet, model.text_encoder):
        for x, y in zip(_outputs(model), base, strict=True):
            torch.testing.assert_close(x, y, atol=0, rtol=0)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with merge_loras([(a, 0.5), (b, -0.4)], model.unet, model.text_encoder) as merged:
        both = _outputs(model)
        assert [m["file"] for m in merged.applied] == [str(a), str(b)]
    assert all(torch.equal(v, originals[k]) for k, v in model.state_dict().items())
    with merge_loras([(a, 0.5)], model.unet, model.text_encoder):  # one after the other
        with merge_loras([(b, -0.4)], model.unet, model.text_encoder):
            nested = _outputs(model)
    for x, y in zip(both, nested, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # kohya's rule: no alpha key means alpha = rank (scale = weight); here alpha is 2 (and 1
    # for 3x3 convs), so a file without alphas at weight w is the file with them at ...
    plain = write_kohya_lora(tmp_path / "plain.safetensors", model, seed=9, alphas=False)
    alpha_file = write_kohya_lora(tmp_path / "alpha.safetensors", model, seed=9)
    lora = read_lora(alpha_file)
    for pair in lora.pairs:  # ... alphas equal to the ranks
        pair.alpha = float(pair.rank)
    with merge_loras([(plain, 0.9)], model.unet, model.text_encoder):
        without = _outputs(model)
    with merge_loras([(lora, 0.9)], model.unet, model.text_encoder):
        for x, y in zip(_outputs(model), without, strict=True):
            assert torch.equal(x, y)


def test_sd15_lora_applies_to_the_gen1_unet(tmp_path):
    path, _ = write_tiny_sd(tmp_path, "base.safetensors", tiny_config("sd1"), seed=3)
    sd = load_sd(path)
    lora = write_kohya_lora(tmp_path / "a.safetensors", sd, seed=1)
    width = sd.text_encoder.config.width
    params = {**config("unet", "tiny"), "context_dim": width}
    video = UNet(**{**params, "in_channels": 5}, temporal=True)
    state = {k: v for k, v in sd.unet.state_dict().items()}
    state["input_blocks.0.0.weight"] = torch.cat(  # the depth channel, zero-filled
        [
            state["input_blocks.0.0.weight"],
            torch.zeros_like(state["input_blocks.0.0.weight"][:, :1]),
        ],
        dim=1,
    )
    video.load_state_dict(state, strict=False)
    temporal = {k: v.clone() for k, v in video.state_dict().items() if "temporal" in k}
    with merge_loras([(lora, 0.8)], video, None, skip_text=True) as merged:
        assert merged.applied[0]["skipped"] == ["text"]
        with merge_loras([(lora, 0.8)], sd.unet, sd.text_encoder):
            x = torch.randn(1, 4, 8, 8)
            ctx = torch.randn(1, 77, width)
            t = torch.tensor([300])
            image = sd.unet(x, t, ctx)
            gen1 = video(torch.cat([x, torch.zeros_like(x[:, :1])], 1), t, ctx)
        torch.testing.assert_close(gen1, image, atol=1e-5, rtol=1e-5)
        assert all(
            torch.equal(v, temporal[k]) for k, v in video.state_dict().items() if k in temporal
        )
    with pytest.raises(CheckpointError, match="text encoder, which this model does not have"):
        merge_loras([(lora, 0.8)], video, None)


def test_bad_files_name_the_file_and_keys(tmp_path):
    path, _ = write_tiny_sd(tmp_path, "base.safetensors", tiny_config("sd1"), seed=3)
    model = load_sd(path)
    good = read_lora(write_kohya_lora(tmp_path / "a.safetensors", model, text=False))
    down = good.pairs[0].down
    cases = {
        "unmatched.safetensors": (
            {"lora_unet_nowhere_0.lora_down.weight": down, "lora_unet_nowhere_0.lora_up.weight":
             torch.zeros(3, down.shape[0])}, "match no layer of this model: lora_unet_nowhere_0"),
        "te2.safetensors": (
            {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 64),
             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(96, 2)},
            "second text encoder"),
        "half.safetensors": (
            {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, "lacking"),
        "loha.safetensors": ({"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2)}, "LoHa"),
        "other.safetensors": ({"model.diffusion_model.x": torch.zeros(2)}, "not a LoRA file"),
        "shape.safetensors": (
            {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 7, 3, 3),
             "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}, "delta of shape"),
    }  # fmt: skip
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / name))
        with pytest.raises(CheckpointError, match=message) as err:
            merge_loras([(tmp_path / name, 1.0)], model.unet, model.text_encoder)
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing.safetensors")
