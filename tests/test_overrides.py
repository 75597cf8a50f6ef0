"""Command-line values as typed in a shell: every file name and prompt reaches the config
exactly, whatever characters Hydra's grammar reserves."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from jobs.overrides import INFER_PATHS, TRAIN_PATHS, quote_path_overrides
from tests.sd_layout import ROOT

NAMES = [
    "clip,v2.mp4",
    "clip (1).mp4",
    "it's.mp4",
    "vidéo_日本.mp4",
    "epoch=3-step=400.ckpt",
    "a b#c [x] {y}.mp4",
    "back\\slash'q.mp4",
    "dollar${x}.mp4",
    "trailing\\",
    "plain/path-1.mp4",
    "a cat, at night (oil; 1.2)",
]


@pytest.mark.parametrize("value", NAMES)
def test_values_reach_the_config_exactly(value):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("infer", overrides=quote_path_overrides([f"input={value}"], INFER_PATHS))
        assert cfg.input == value
        args = quote_path_overrides([f"prompt={value}", f"negative_prompt={value}"], INFER_PATHS)
        cfg = compose("infer", overrides=args)
        assert cfg.prompt == value == cfg.negative_prompt
        args = quote_path_overrides(["data=videos", f"data.root={value}"], TRAIN_PATHS)
        assert compose("train", overrides=[*args, "run_dir=x"]).data.root == value


def test_other_keys_and_hydra_syntax_are_left_alone():
    argv = ["steps=3", "'prompt=\"quoted\"'", "input=[a,b]", "w=7.5", 'prompt="x y"']
    assert quote_path_overrides(argv, INFER_PATHS) == argv


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        (
            "infer.py",
            ["samplr=ddim"],
            "infer.py: error: unknown key 'samplr' (not in configs/infer.yaml); did you mean",
        ),
        ("infer.py", ["steps=abc"], "infer.py: error: steps must be a whole number, got 'abc'"),
        ("train.py", ["trainer.max_stepz=3"], "train.py: error: unknown key 'trainer.max_stepz'"),
    ],
)
def test_a_mistyped_key_or_value_is_one_line(script, args, message):
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith(message)
