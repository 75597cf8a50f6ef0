"""Reading torch pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) as data only.

A Lightning checkpoint pickles more than tensors: callback states with numpy scalars
(EarlyStopping's ``best_score``), ``pathlib`` paths, dataclasses, optimiser states. torch's
``weights_only`` reader refuses all of those (or asks for every class to be allowlisted), and
a plain ``torch.load`` would build whatever class the file names, running its code. Here the
unpickler resolves only the globals torch itself deems safe (tensor and storage rebuilders,
dtypes, ``OrderedDict``...); every other name becomes an inert placeholder that accepts any
constructor, ``__reduce__`` or state arguments and keeps none of them. Names that mean running
code (``os.system``, ``builtins.eval``, ``subprocess.*``...) are refused outright, naming the
object, before anything is called. The standard restricted-unpickler pattern
(docs.python.org, "Restricting Globals"), with torch's own allowlist.
"""

from __future__ import annotations

import builtins
import pickle
import types
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler

# Modules whose every name is a way to run code or touch the system: refused, never resolved.
CODE_MODULES = frozenset(
    "os posix nt sys subprocess shutil importlib runpy pty socket pickle _pickle marshal "
    "ctypes code codeop webbrowser multiprocessing threading signal asyncio io _io "
    "commands platform tempfile glob builtins __builtin__ operator functools types".split()
)
# builtins that are plain data constructors; every other builtin (eval, exec, getattr,
# __import__, open, ...) is refused.
DATA_BUILTINS = frozenset(
    "set frozenset complex bytearray bytes slice list dict tuple int float str bool object "
    "range".split()
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a function which runs code; nothing was called."""


class PickledObject:
    """Stands in for an object of a class a pickle names: takes any constructor, ``__reduce__``,
    item or state arguments and keeps none of them. ``pickled_class`` says what it was."""

    pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickled_class}>"


@cache
def placeholder(qualified_name: str) -> type[PickledObject]:
    """The placeholder class standing in for ``qualified_name`` (one per name)."""
    short = qualified_name.rsplit(".", 1)[-1] or "object"
    return type(short, (PickledObject,), {"pickled_class": qualified_name})


def resolve_global(module: str, name: str) -> Any:
    """What a pickle's reference to ``module.name`` becomes: torch's safe global, a data
    builtin, or a placeholder class. Raises :class:`UnsafePickleError` for code."""
    qualified = f"{module}.{name}"
    allowed = _weights_only_unpickler._get_allowed_globals()
    if qualified in allowed:
        return allowed[qualified]
    if module in ("builtins", "__builtin__") and name in DATA_BUILTINS:
        return getattr(builtins, name)
    if module.split(".")[0] in CODE_MODULES:
        raise UnsafePickleError(
            f"the file pickles a reference to {qualified}, which runs code, not data; refused "
            "and nothing was run"
        )
    return placeholder(qualified)


class DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves globals with :func:`resolve_global` only."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)


# torch.load takes a pickle *module*; this one offers the data-only unpickler.
_PICKLE_MODULE = types.ModuleType("data_only_pickle")
_PICKLE_MODULE.Unpickler = DataOnlyUnpickler
_PICKLE_MODULE.load = lambda file, **kwargs: DataOnlyUnpickler(file, **kwargs).load()
_PICKLE_MODULE.__dict__.update(
    {k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL", "PickleError")}
)


def load_data_only(path: str | Path) -> Any:
    """The contents of a torch pickle file on the CPU, tensors memory-mapped where the file
    format allows; every non-tensor object of a class outside torch's safe list is a
    :class:`PickledObject`.

    Raises :class:`UnsafePickleError` (naming the global) for a file that references code,
    and whatever torch or pickle raise for files that are not readable pickles.
    """
    path = Path(path)
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE, mmap=True
        )
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        # The legacy (pre-zip) format cannot be memory-mapped.
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE
        )
