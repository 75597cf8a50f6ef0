"""The editing pipeline: temporal windows and their blending, masked / SDEdit editing, content,
seeds and half precision, on the tiny Gen-1 at 32x32 (CPU, a few steps)."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from jobs.training import build_model
from model.diffusion.noise import frame_noise
from model.diffusion.windows import WindowedDenoiser, taper_weights, window_slices
from model.editing.content import image_content, text_content
from model.editing.pipeline import decode_latents, edit_video, encode_frames, video_depth
from model.editing.precision import autocast, cast_for_inference
from model.editing.settings import EditSettings, check_settings, settings_from_config
from model.encoders.frozen import build_depth
from tests.sd_layout import ROOT

SIZE = 32
FAST = {"steps": 2, "w": 3.0, "w_t": 1.0}


def tiny_gen1(temporal: bool = False):
    """The tiny Gen-1 with its zero-initialised spatial layers (output convolutions) randomised,
    so that its predictions depend on their inputs; with ``temporal``, its temporal layers too
    (else they stay zero and the video UNet works frame by frame)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["run_dir=unused", "model.ema_decay=null", "model.depth=null"]
        )
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            is_temporal = ".temporal." in name
            if (is_temporal and temporal) or (not is_temporal and not p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def gen1():
    return tiny_gen1()


@pytest.fixture(scope="module")
def temporal_gen1():
    """The tiny model whose temporal layers are on: its frames interact."""
    return tiny_gen1(temporal=True)


def video(num_frames, seed=0):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.rand(1, num_frames, 3, SIZE, SIZE, generator=gen) * 2 - 1
    depth = torch.rand(1, num_frames, 1, SIZE, SIZE, generator=gen)
    return frames, depth


def content_of(gen1, frames):
    return gen1.encode_content(frames[:, 0])


def run(gen1, frames, depth, seed=0, **settings):
    return edit_video(
        gen1,
        frames,
        content_of(gen1, frames),
        EditSettings(**{**FAST, **settings}),
        depth=depth,
        generator=torch.Generator().manual_seed(seed),
    )


# --- windows -----------------------------------------------------------------------------


@pytest.mark.parametrize("frames,length,overlap", [(24, 8, 2), (24, 8, 4), (10, 4, 1), (9, 4, 0)])
def test_windows_are_full_length_overlap_and_cover_every_frame(frames, length, overlap):
    windows = window_slices(frames, length, overlap)
    assert windows[0].start == 0 and windows[-1].stop == frames
    assert all(w.stop - w.start == length for w in windows)
    for a, b in zip(windows, windows[1:], strict=False):
        assert a.start < b.start and a.stop - b.start >= overlap
    assert set().union(*(range(w.start, w.stop) for w in windows)) == set(range(frames))
    assert window_slices(length - 1, length, overlap) == [slice(0, length - 1)]
    with pytest.raises(ValueError, match="overlap"):
        window_slices(frames, length, length)


def test_taper_weights_ramp_only_at_shared_edges():
    inner = taper_weights(8, 3, left=True, right=True)
    assert torch.allclose(inner, torch.tensor([0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]))
    first = taper_weights(8, 3, left=False, right=True)
    assert torch.all(first[:5] == 1) and first[-1] == 0.25
    assert torch.all(taper_weights(8, 0, True, True) == 1)


def per_frame_denoiser(calls):
    """A denoiser without interaction between frames, using per-frame structure and per-clip
    context; records the frame count of each call."""

    def denoiser(x, sigma, cond, uncond=None):
        calls.append(x.shape[1])
        assert cond["structure"].shape[1] == x.shape[1]
        assert cond["context"].shape == (x.shape[0], 1, 8)
        s = sigma.view(-1, 1, 1, 1, 1)
        return (
            x / (1 + s**2) + 0.3 * cond["structure"] + cond["context"].mean(-1).view(-1, 1, 1, 1, 1)
        )

    return denoiser


def test_windowed_denoiser_equals_the_whole_video_call_for_a_per_frame_denoiser():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 4, 3, 3, generator=gen)
    cond = {"structure": torch.randn(2, 11, 1, 3, 3, generator=gen), "context": torch.ones(2, 1, 8)}
    sigma = torch.full((2,), 1.5)
    whole_calls, window_calls = [], []
    whole = per_frame_denoiser(whole_calls)(x, sigma, cond=cond)
    windowed = WindowedDenoiser(per_frame_denoiser(window_calls), length=4, overlap=2)
    out = windowed(x, sigma, cond=cond)
    assert torch.allclose(out, whole, atol=1e-6)
    assert whole_calls == [11] and window_calls == [4] * len(window_slices(11, 4, 2))


def test_windowed_denoiser_blends_overlaps_by_the_taper():
    """Window k predicts the constant k: frames covered once get k, shared frames a weighted
    mean of their windows, by exactly the taper weights."""
    calls = []

    def constant(x, sigma):
        calls.append(len(calls))
        return torch.full_like(x, float(len(calls) - 1))

    out = WindowedDenoiser(constant, length=6, overlap=2)(torch.zeros(1, 10, 1, 1, 1), 1.0)
    values = out.flatten().tolist()  # windows [0, 6) and [4, 10)
    assert values[:4] == [0.0] * 4 and values[6:] == [1.0] * 4
    # frames 4, 5: window 0 weights (2/3, 1/3), window 1 weights (1/3, 2/3)
    assert values[4] == pytest.approx(1 / 3) and values[5] == pytest.approx(2 / 3)


# --- the pipeline ------------------------------------------------------------------------


def test_windowed_edit_equals_the_whole_clip_edit_while_temporal_layers_are_zero(gen1):
    """A fresh video UNet works frame by frame (zero-initialised temporal layers), so windows,
    their slicing of latents and structure, and their blending must change nothing."""
    frames, depth = video(10)
    windowed = run(gen1, frames, depth, window_length=4, window_overlap=1)
    whole = run(gen1, frames, depth, window_length=10, window_overlap=1)
    assert windowed.frames.shape == (1, 10, 3, SIZE, SIZE)
    assert windowed.windows == [(0, 4), (3, 7), (6, 10)]
    assert windowed.window_calls == 3 * FAST["steps"] and whole.window_calls == FAST["steps"]
    assert torch.allclose(windowed.frames, whole.frames, atol=1e-4)


def test_the_unet_never_sees_more_frames_than_a_window(temporal_gen1):
    frames, depth = video(8)
    seen = []
    hook = temporal_gen1.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        windowed = run(temporal_gen1, frames, depth, window_length=4, window_overlap=1)
    finally:
        hook.remove()
    assert {shape[1] for shape in seen} == {4}
    assert len(seen) == 3 * FAST["steps"]  # windows [0,4) [3,7) [4,8), one batched call each
    whole = run(temporal_gen1, frames, depth, window_length=8, window_overlap=1)
    assert not torch.allclose(windowed.frames, whole.frames, atol=1e-3)  # frames do interact


def test_seed_reproduces_an_edit_and_another_seed_changes_it(gen1):
    frames, depth = video(4)
    a, c = (run(gen1, frames, depth, seed=s).frames for s in (7, 8))
    b = edit_video(
        gen1, frames, content_of(gen1, frames), EditSettings(**FAST), depth=depth,
        generator=torch.Generator().manual_seed(7),
    ).frames  # fmt: skip
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)
    assert a.min() >= -1 and a.max() <= 1


def test_method_mov2mov_runs_the_video_model_frame_by_frame(temporal_gen1):
    """The Gen-1 UNet with its temporal layers off is an image model too: under mov2mov a
    frame's output ignores its neighbours, under the default video method it does not."""
    frames, depth = video(3)
    changed, changed_depth = frames.clone(), depth.clone()
    other_frames, other_depth = video(1, seed=9)
    changed[:, 1], changed_depth[:, 1] = other_frames[:, 0], 5 * other_depth[:, 0]
    for method, coupled in (("mov2mov", False), (None, True)):
        first = run(temporal_gen1, frames, depth, method=method, strength=0.6)
        second = run(temporal_gen1, changed, changed_depth, method=method, strength=0.6)
        assert first.method == (method or "gen1")
        moved = (first.frames[:, [0, 2]] - second.frames[:, [0, 2]]).abs().max()
        assert (moved > 1e-3) if coupled else (moved < 1e-5), (method, moved)


def test_frame_noise_correlates_frames_by_the_share_asked_for():
    shape = (2, 3, 4, 32, 32)
    independent = frame_noise(shape, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(independent, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    shared = frame_noise(shape, 1.0, torch.Generator().manual_seed(3))
    assert torch.allclose(shared, shared[:, :1].expand(shape))
    assert not torch.allclose(shared[0], shared[1])  # each clip of the batch its own draw
    mixed = frame_noise((1, 2, 4, 256, 256), 0.5, torch.Generator().manual_seed(3))
    a, b = mixed[0, 0].flatten(), mixed[0, 1].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] == pytest.approx(0.5, abs=0.02)
    assert a.std() == pytest.approx(1.0, abs=0.02)  # each frame stays unit Gaussian


def test_noise_correlation_one_edits_a_still_clip_to_equal_frames(gen1):
    frames, depth = video(1)
    still_frames, still_depth = frames.expand(1, 4, -1, -1, -1), depth.expand(1, 4, -1, -1, -1)
    out = run(gen1, still_frames, still_depth, noise_correlation=1.0).frames[0]
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-5)
    out = run(gen1, still_frames, still_depth).frames[0]  # independent noise: frames differ
    assert (out[1:] - out[:1]).abs().amax() > 1e-2
    with pytest.raises(ValueError, match="noise_correlation must be in"):
        run(gen1, frames, depth, noise_correlation=1.5)


def test_out_of_range_guidance_is_refused_and_steps_run_are_reported(gen1):
    frames, depth = video(2)
    for key, value in (("w_t", -0.5), ("w", -1.0), ("eta", -0.1)):
        with pytest.raises(ValueError, match=f"{key}.* must be >= 0"):
            check_settings(EditSettings(**{key: value}))
    assert run(gen1, frames, depth, steps=4, strength=0.1).steps_run == 1
    assert run(gen1, frames, depth, steps=4).steps_run == 4


@pytest.mark.parametrize("prepack", ["auto", True])  # auto: the default
def test_prepacked_cpu_edit_matches_the_plain_one(temporal_gen1, prepack, caplog):
    frames, depth = video(4)
    with caplog.at_level("INFO", logger="model.weights.calibration"):
        packed = run(temporal_gen1, frames, depth, prepack=prepack).frames
    plain = run(temporal_gen1, frames, depth, prepack=False).frames
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)
    assert (plain[:, 1:] - plain[:, :1]).abs().amax() > 1e-2  # a real edit, not a constant
    calibrated = [r.message for r in caplog.records if r.message.startswith("prepack=auto: UNet")]
    assert len(calibrated) == (prepack == "auto")  # one line for the UNet, after its first call
    assert EditSettings().prepack == "auto"
    with pytest.raises(ValueError, match="prepack must be auto, true or false"):
        check_settings(EditSettings(prepack="yes"))


def test_settings_from_config_reads_flat_keys_and_the_window():
    config = {"steps": 7, "w_t": 1.5, "window": {"length": 6, "overlap": 3}, "device": "cpu"}
    settings = settings_from_config(config, w_t=2.0)
    assert (settings.steps, settings.w_t) == (7, 2.0)  # the override wins
    assert (settings.window_length, settings.window_overlap) == (6, 3)
    assert settings.strength == EditSettings().strength  # absent keys keep the default


def test_strength_zero_returns_the_source_through_the_vae(gen1):
    frames, depth = video(4)
    out = run(gen1, frames, depth, strength=0.0).frames
    roundtrip = decode_latents(gen1.vae, encode_frames(gen1.vae, frames, 8, "cpu"), 8)
    assert torch.allclose(out, roundtrip, atol=1e-5)
    partial = run(gen1, frames, depth, strength=0.5, steps=4).frames
    assert not torch.allclose(partial, roundtrip, atol=1e-3)


def test_masked_edit_changes_only_the_inside_of_the_mask(gen1):
    frames, depth = video(4)
    mask = torch.zeros(1, 1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1  # edit the left half
    kept = edit_video(
        gen1, frames, content_of(gen1, frames), EditSettings(**FAST), depth=depth, mask=mask,
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert torch.equal(kept[..., SIZE // 2 :], frames[..., SIZE // 2 :])
    assert not torch.allclose(kept[..., : SIZE // 2], frames[..., : SIZE // 2], atol=1e-2)
    # Without pasting pixels back, the latents outside the mask are exactly the source's.
    nothing = edit_video(
        gen1, frames, content_of(gen1, frames),
        EditSettings(**FAST, keep_unmasked_pixels=False), depth=depth, mask=mask * 0,
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    roundtrip = decode_latents(gen1.vae, encode_frames(gen1.vae, frames, 8, "cpu"), 8)
    assert torch.allclose(nothing, roundtrip, atol=1e-5)


def test_midas_depth_in_chunks_equals_one_call(gen1):
    frames, _ = video(5)
    torch.manual_seed(1)  # a random MiDaS whose output is not flat
    midas = build_depth({"name": "midas_tiny"})
    chunked = video_depth(gen1, frames, midas, chunk_size=2)
    assert chunked.shape == (1, 5, 1, SIZE, SIZE) and chunked.std() > 0
    assert torch.allclose(chunked, midas(frames), atol=1e-5)
    result = edit_video(
        gen1, frames, content_of(gen1, frames), EditSettings(**FAST, chunk_size=2),
        depth_estimator=midas, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert result.depth.shape == (1, 5, 1, SIZE, SIZE) and result.depth.abs().max() == 1
    with pytest.raises(ValueError, match="no depth estimator"):
        video_depth(gen1, frames)


def test_text_content_needs_a_prior_unless_direct(gen1):
    with pytest.raises(ValueError, match="prompt_mode=direct"):
        text_content(gen1, "a red cube")
    direct = text_content(gen1, "a red cube", mode="direct")
    assert direct.shape == (1, 1, gen1.clip.embed_dim)
    doubled = text_content(gen1, "a red cube", mode="prior", prior=lambda e: 2 * e)
    assert torch.allclose(doubled, 2 * direct)


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.float16, marks=pytest.mark.slow), torch.bfloat16],  # fp16 is slow on CPU
)
def test_half_precision_edit_is_close_to_float32(dtype):
    """The GPU path (fp16 weights, autocast), run on the CPU; bf16 is the CPU's fast half."""
    frames, depth = video(4)
    full = tiny_gen1()
    half = cast_for_inference(tiny_gen1(), dtype)
    assert half.unet.out[2].weight.dtype == dtype
    assert half.unet.out[0].weight.dtype == torch.float32  # normalisation stays float32
    settings = EditSettings(**FAST)
    content = content_of(full, frames)
    expected = edit_video(
        full, frames, content, settings, depth=depth, generator=torch.Generator().manual_seed(0)
    ).frames
    got = edit_video(
        half, frames, content, settings, depth=depth, autocast_dtype=dtype,
        generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert got.dtype == torch.float32
    with autocast("cpu", dtype):  # content, as infer.py computes it on a half model
        half_content = image_content(half, frames[:, 0])
        half_text = text_content(half, "a red cube", mode="direct")
    assert torch.allclose(half_content, content, atol=0.1 * content.abs().max())
    assert half_text.dtype == torch.float32 and half_text.isfinite().all()
    error = (got - expected).abs()
    max_error, mean_error = (0.03, 0.005) if dtype == torch.float16 else (0.15, 0.02)
    assert error.max() < max_error and error.mean() < mean_error
