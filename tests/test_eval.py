"""eval.py end to end on a tiny random Gen-1 release: compare and sweep outputs, the noise
seeds of the frame-by-frame settings, and one clear line for a bad setting."""

import dataclasses
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

import eval as eval_cli
from jobs.evaluation import clips, modes, reports, scoring, settings
from jobs.training import build_model
from model.encoders.prior import export_prior
from model.training.loading import load_gen1
from model.weights.release import inference_config, inference_state, write_release
from tests.sd_layout import ROOT
from tests.test_prior import small_prior

FAST = ["num_clips=2", "num_frames=4", "steps=2", "w=3", "progress=false", "seed=5"]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The tiny Gen-1 with a tiny MiDaS, every weight random, as a release file.

    Zero-initialised UNet layers are randomised (so outputs depend on content, structure and
    the temporal layers), and the MiDaS head gets a positive bias so its ReLU output varies.
    """
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["run_dir=unused", "model.depth={name: midas_tiny, weights: null}"],
        )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.depth.net.scratch.output_conv[-2].bias.fill_(1.0)
    path = tmp_path_factory.mktemp("eval") / "tiny.safetensors"
    write_release(inference_config(model.hparams), inference_state(model.state_dict(), False), path)
    return path


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def finite_scores(scores: dict) -> bool:
    return all(math.isfinite(v) for v in scores.values())


def test_compare_writes_table_and_per_clip_json_for_the_four_settings(release, tmp_path, capsys):
    out = tmp_path / "eval"
    cfg = config(f"checkpoint={release}", f"output_dir={out}", *FAST)
    assert eval_cli.cli(cfg) == 0
    printed = capsys.readouterr().out
    labels = [v.format(w_t=1.0) for v in modes.SETTINGS.values()]
    for label in [reports.INPUT_ROW, *labels]:
        assert f"| {label} |" in printed
    assert "| setting | frame consistency | warp error | structure fidelity |" in printed
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    assert (out / "compare.md").read_text().count("| frame by frame") == 2
    assert (out / "compare.md").read_text().count("| video model") == 2
    report = json.loads((out / "compare.json").read_text())
    assert report["settings"]["num_clips"] == 2 and report["checkpoint"]["sha256"]
    assert len(report["clips"]) == 2
    for entry in [report["mean"], *(c["scores"] for c in report["clips"])]:
        assert set(entry) == {reports.INPUT_ROW, *labels}
        for scores in entry.values():
            assert set(scores) == set(reports.METRICS) and finite_scores(scores)
    clip = report["clips"][0]
    assert clip["key"].startswith("world#200000000#4x64x64")
    assert clip["reference"] == "world#200000002#4x64x64"  # another held-out clip
    unedited = report["mean"][reports.INPUT_ROW]
    assert unedited["structure_fidelity"] == pytest.approx(0.0, abs=1e-6)  # same MiDaS, same input
    assert unedited["warp_error"] < 2e-3  # the world moves exactly with its flow
    assert all(report["mean"][label]["structure_fidelity"] > 1e-4 for label in labels)


def test_frame_by_frame_noise_is_shared_or_independent_as_named(release):
    cfg = config(f"checkpoint={release}", *FAST)
    gen1, estimator = settings.load_model(cfg, torch.device("cpu"))
    clip = next(clips.world_clips(cfg))
    still = clip.frames[:, :1].expand_as(clip.frames)  # four copies of frame 0
    editor = scoring.Editor(cfg, gen1, estimator, dataclasses.replace(clip, frames=still))
    shared = editor.frame_by_frame(t_s=3, shared_noise=True)
    independent = editor.frame_by_frame(t_s=3, shared_noise=False)
    assert shared.shape == independent.shape == (4, 3, 64, 64)
    assert torch.allclose(shared, shared[:1].expand_as(shared), atol=1e-5)  # same noise per frame
    assert torch.allclose(independent[0], shared[0], atol=1e-5)  # frame 0: the clip's seed
    assert (independent[1:] - independent[:1]).abs().amax() > 1e-2  # seeds differ per frame
    video = editor.video(w_t=1.0, t_s=3)
    assert video.shape == (4, 3, 64, 64) and not torch.allclose(video, shared, atol=1e-3)
    video_shared = editor.video(w_t=1.0, t_s=3, noise_correlation=1.0)
    assert not torch.allclose(video_shared, video, atol=1e-3)  # the setting reaches the sampler


def test_sweep_writes_tables_and_two_plots(release, tmp_path):
    out = tmp_path / "sweep"
    cfg = config(
        f"checkpoint={release}", f"output_dir={out}", "mode=sweep", *FAST, "num_clips=1",
        "num_frames=3", "sweep.w_t=[0,1.5]", "sweep.t_s=[0,4]", "prompt=null",
    )  # fmt: skip
    outcome = modes.run(cfg)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sweep.json", "sweep.md", "sweep_t_s.png", "sweep_w_t.png"]
    for png in ("sweep_t_s.png", "sweep_w_t.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "sweep.md").read_text()
    assert "Temporal guidance w_t (t_s=3)" in text and "Structure fidelity t_s (w_t=1)" in text
    assert "prompt consistency" not in text  # prompt=null: no prompt score
    means = json.loads((out / "sweep.json").read_text())["mean"]
    assert set(means["w_t"]) == {"0", "1.5"} and set(means["t_s"]) == {"0", "4"}
    assert all(finite_scores(s) for axis in means.values() for s in axis.values())
    assert means["w_t"]["0"] != means["w_t"]["1.5"]  # w_t changes the edit
    assert outcome["files"][0].endswith("sweep.json")


def test_prompts_compares_the_prior_with_the_raw_text_embedding(release, tmp_path):
    prior = export_prior(small_prior(), tmp_path / "prior.safetensors")
    out = tmp_path / "prompts"
    cfg = config(
        f"checkpoint={release}", f"output_dir={out}", "mode=prompts", f"prior={prior}",
        *FAST, "num_clips=1", "num_frames=3", "prior_pairs=8",
    )  # fmt: skip
    outcome = modes.run(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["prompts.json", "prompts.md"]
    means = outcome["mean"]
    assert set(means) == {"prompt_mode=prior", "prompt_mode=direct"}
    assert all("prompt_consistency" in s and finite_scores(s) for s in means.values())
    assert means["prompt_mode=prior"] != means["prompt_mode=direct"]  # the prior changes content
    embeddings = outcome["embeddings"]
    assert embeddings["count"] == 8 and -1 <= embeddings["cos_prior"] <= 1
    assert "| prior sample |" in (out / "prompts.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint=missing/gen1.safetensors"], "checkpoint not found: missing/gen1.safetensors"),
        (["mode=grid"], "mode must be one of compare, sweep, prompts"),
        (["mode=prompts", "prior=missing.safetensors"], "needs prior=FILE"),
        (["content=prompt", "prompt=null"], "content=prompt needs prompt"),
        (["num_frames=1"], "num_frames must be in [2"),
        (["steps=0"], "steps must be >= 1"),
        (["mode=methods", "methods.image=[gen1]"], "gen1 runs on its own"),
        (["mode=methods", "methods.strength=1"], "prev_frame starts each frame's"),
        (["mode=methods", "methods.image=[cross_frame+prev_frame]"], "sampled together"),
        (["mode=methods", "methods.sd_checkpoint=none.safetensors"], "sd_checkpoint not found"),
        (["mode=methods", "methods.controlnet.file=none.safetensors"], "controlnet.file not found"),
        (["mode=methods", "methods.controlnet.scale=-1"], "controlnet.scale must be >= 0"),
        (["mode=methods", "methods.controlnet.image=[gen1]"], "controlnet.image lists image-model"),
    ],
)
def test_bad_settings_are_one_line_and_status_1(release, tmp_path, capsys, overrides, message):
    out = tmp_path / "never"
    cfg = config(f"checkpoint={release}", f"output_dir={out}", *FAST, *overrides)
    assert eval_cli.cli(cfg) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_a_model_without_depth_needs_a_midas(release, tmp_path, capsys):
    gen1 = load_gen1(release)
    config_no_depth = {**inference_config(gen1.hparams), "depth": None}
    state = {k: v for k, v in gen1.state_dict().items() if not k.startswith("depth.")}
    path = tmp_path / "no_depth.safetensors"
    write_release(config_no_depth, state, path)
    assert eval_cli.cli(config(f"checkpoint={path}", *FAST)) == 1
    assert "has no depth model" in capsys.readouterr().err


@pytest.mark.slow
def test_methods_mode_scores_every_method_on_every_model(tmp_path):
    """mode=methods on the bundled tiny SD (alone and with its depth ControlNet) and tiny world
    model: every (model, method) row at each speed with standard errors over two clips, the
    paired findings, the table, the CSV and the plot (about a minute on one thread)."""
    out = tmp_path / "methods"
    cfg = config(f"output_dir={out}", "mode=methods", "methods.num_clips=2", "num_frames=3",
                 "methods.steps=2", "methods.speeds=[1,4]", "progress=false")  # fmt: skip
    outcome = modes.run(cfg)
    names = ["methods.csv", "methods.json", "methods.md", "methods.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert set(outcome["mean"]) == {"1", "4"}
    rows = outcome["mean"]["4"]
    assert len(rows) == 6 + 6 + 7 and "Gen-1 tiny / gen1" in rows
    assert "tiny SD + ControlNet / cross_frame" in rows
    assert rows["tiny SD + ControlNet / mov2mov"] != rows["tiny SD / mov2mov"]
    assert all(finite_scores(s) for s in rows.values())
    assert all(finite_scores(s) for s in outcome["standard_error"]["4"].values())
    assert (out / "methods.csv").read_text().count("\n") == 1 + 2 * len(rows)
    table = (out / "methods.md").read_text()
    assert " ± " in table and "Video model minus it, paired over the 2 clips" in table
    assert all("latent_motion" in c and len(c["motion_noise_equals_mov2mov"]) == 3
               for c in outcome["clips"])  # fmt: skip
