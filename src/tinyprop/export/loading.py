"""Load a model file for export without running code from it.

``torch.load`` always runs with ``weights_only=True``: PyTorch's restricted unpickler, which
builds tensors, containers and numbers and nothing else. A whole pickled model (``torch.save(
model)``) is loaded through the same unpickler with PyTorch's own ``torch.nn`` layer classes
allow-listed, so a file naming any other class or function is refused before anything in it
runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import nn

ALLOWED_MODULES = tuple(
    value
    for value in vars(nn).values()
    if isinstance(value, type)
    and issubclass(value, nn.Module)
    and value.__module__.startswith("torch.nn.")
) + (nn.Parameter,)  # torch's own layer classes: export names the ones the runtime lacks


class UnsafeModelFileError(ValueError):
    """The model file is unreadable, or names something the restricted unpickler refuses."""


def load_model_file(path: Path) -> object:
    """What ``path`` holds (a ``state_dict`` or an allow-listed ``nn.Module``), loaded without
    running code from it.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        UnsafeModelFileError: unreadable, not a torch file, or naming a class or function that is
            not allowed, in one line that says what to do.
    """
    if path.is_dir():
        raise FileNotFoundError(f"model file {path} is a folder; give the .pt file")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"model file {path} {what}")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_MODULES)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        refused = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(error))
        if refused is not None:
            raise UnsafeModelFileError(
                f"{path}: it names {refused.group(1)}, which export does not load (loading it "
                "could run code from the file); save a state_dict (torch.save(model.state_dict(),"
                " ...)) and pass --model DATASET, or save an nn.Sequential of plain torch.nn layers"
            ) from None
        reason = str(error).strip().split(". ")[0].splitlines()[0][:120] if str(error) else "empty"
        raise UnsafeModelFileError(
            f"{path} is not a readable torch file ({reason}); give a file written by torch.save"
        ) from None
