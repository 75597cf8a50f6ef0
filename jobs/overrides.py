"""File paths and prompts on the command line, as a user types them in a shell, made into
overrides Hydra can parse.

Hydra's override grammar reserves characters that real file names hold: ``=`` (Lightning's
``epoch=3-step=400.ckpt``), ``,``, ``(`` ``)``, ``[`` ``]``, ``'``, ``#``, spaces and non-ASCII
letters (``vidéo_日本.mp4``); an unquoted value with one of them ends in a lexer traceback. The
entry points pass ``sys.argv`` through :func:`quote_path_overrides` before Hydra reads it, so
``input=clip (1).mp4`` (one shell word) reaches Hydra as ``input='clip (1).mp4'``. Only the
keys an entry point names as paths or free text (prompts) are touched; values already
quoted, or written as a Hydra list or dict, are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# What Hydra's grammar takes unquoted in a value (letters, digits and a few symbols).
UNQUOTED = re.compile(r"[A-Za-z0-9_/\-+.%*@?|~]*")

INFER_PATHS = ("input", "output", "checkpoint", "reference", "default_reference", "mask")
INFER_PATHS += ("depth", "prior", "midas.weights", "sd.config", "hydra.run.dir")
INFER_PATHS += ("hed", "prompt", "negative_prompt")  # free text, as any file name
TRAIN_PATHS = ("data.root", "data.manifest", "data.image_root", "data.image_manifest")
TRAIN_PATHS += ("data.cache_dir", "ckpt_path", "run_dir", "hydra.run.dir", "model.weights.vae")
TRAIN_PATHS += ("model.weights.unet", "model.weights.sd_checkpoint", "model.clip.weights")
TRAIN_PATHS += ("model.depth.weights", "data.videos", "data.images", "data.val", "data.url_format")
SHARD_PATHS = ("videos.root", "videos.manifest", "images.root", "images.manifest", "output")
SHARD_PATHS += ("model.weights.vae", "model.weights.sd_checkpoint", "model.clip.weights")
SHARD_PATHS += ("model.depth.weights", "hydra.run.dir")
EVAL_PATHS = ("checkpoint", "prior", "output_dir", "midas.weights", "hydra.run.dir", "prompt")


def hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra string: quotes and backslashes before them escaped,
    and ``${`` escaped so that OmegaConf does not read it as an interpolation."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\*)$", lambda m: m.group(1) * 2, escaped)
    return "'" + escaped.replace("${", "\\${") + "'"


def quote_path_overrides(argv: Sequence[str], keys: Iterable[str]) -> list[str]:
    """``argv`` with every ``KEY=VALUE`` (or ``+KEY=`` / ``++KEY=``) whose key is in ``keys``
    and whose value Hydra would not parse as a plain string rewritten as ``KEY='VALUE'``."""
    keys = set(keys)
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") in keys and not _leave_alone(value):
            arg = f"{key}={hydra_quoted(value)}"
        out.append(arg)
    return out


def _leave_alone(value: str) -> bool:
    """Values Hydra reads as meant: plain ones, quoted ones, lists and dicts, null."""
    if UNQUOTED.fullmatch(value):
        return True
    return value[:1] in ("'", '"', "[", "{")


def override_error(config_dir: str, config_name: str, argv: Sequence[str]) -> str | None:
    """One line saying why the overrides in ``argv`` do not compose with ``config_name``
    (a mistyped key, with the nearest known keys; a value of the wrong type), or None when
    they compose. Run before Hydra, whose own report of these is several lines."""
    import difflib

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = [a for a in argv if "=" in a and not a.lstrip("+~").startswith("hydra.")]
    overrides += [a for a in argv if a.startswith("~")]
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name, overrides=overrides)
    except Exception as err:  # Hydra's and OmegaConf's errors alike: report the first line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        match = re.search(r"Key '([^']+)' is not in struct", reason) or re.search(
            r"Could not override '([^']+)'", reason
        )
        if match:
            key = match.group(1)
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                known = list(_flat_keys(OmegaConf.to_container(compose(config_name))))
            near = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            return f"unknown key {key!r} (not in configs/{config_name}.yaml){hint}"
        return reason
    return None


def _flat_keys(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield f"{prefix}{key}"
            yield from _flat_keys(value, f"{prefix}{key}.")


def exit_on_override_error(script: str, config_name: str, argv: Sequence[str]) -> None:
    """Exit with status 1 and one line ``SCRIPT: error: ...`` when ``argv``'s overrides do not
    compose (see :func:`override_error`); multirun sweeps are left to Hydra."""
    import sys
    from pathlib import Path

    if "-m" in argv or "--multirun" in argv:
        return
    configs = str(Path(__file__).resolve().parents[1] / "configs")
    problem = override_error(configs, config_name, argv)
    if problem:
        print(f"{script}: error: {problem}", file=sys.stderr)
        sys.exit(1)
