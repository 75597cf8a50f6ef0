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
INFER_PATHS += ("prompt", "negative_prompt")  # free text, as any file name
TRAIN_PATHS = ("data.root", "data.manifest", "data.image_root", "data.image_manifest")
TRAIN_PATHS += ("data.cache_dir", "ckpt_path", "run_dir", "hydra.run.dir", "model.weights.vae")
TRAIN_PATHS += ("model.weights.unet", "model.weights.sd_checkpoint", "model.clip.weights")
TRAIN_PATHS += ("model.depth.weights",)
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
