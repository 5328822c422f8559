"""Load a model file for export without running code from it.

``torch.load`` always runs with ``weights_only=True``: PyTorch's restricted unpickler, which
builds tensors, containers and numbers and nothing else. A whole pickled model (``torch.save(
model)``) is loaded through the same unpickler with PyTorch's own ``torch.nn`` layer classes
allow-listed, so a file naming any other class or function is refused before anything in it
runs. The records of a zip file (what ``torch.save`` writes) are checked against their CRC-32
first: PyTorch's reader does not check them, and a file damaged in a tensor's record loaded with
that weight changed, silently.
"""

from __future__ import annotations

import pickle
import re
import zipfile
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


FLOAT32_MAX = 3.4028234663852886e38


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
    damaged = damaged_record(path)
    if damaged is not None:
        raise UnsafeModelFileError(
            f"{path} is damaged: {damaged}; nothing was exported (its weights would be wrong). "
            "Copy or save the file again (torch.save)"
        )
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


def damaged_record(path: Path, chunk: int = 1 << 20) -> str | None:
    """What is wrong with the zip file ``path`` when one of its records (a tensor's bytes, the
    pickle) does not match the CRC-32 stored for it, or its directory cannot be read; None for
    a sound zip file and for a file that is no zip (``torch.load`` says what that is)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:  # BadZipFile at its end on a CRC mismatch
                    while record.read(chunk):
                        pass
    except zipfile.BadZipFile as error:
        return f"a record fails its check ({str(error).rstrip('.')})"
    except (OSError, ValueError, EOFError, NotImplementedError, UnicodeDecodeError) as error:
        return f"its zip directory is unreadable ({type(error).__name__}: {str(error)[:80]})"
    return None


def is_tensor_dict(value: object) -> bool:
    """A non-empty dict of tensors: what a ``state_dict`` is."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def checkpoint_entry(loaded: dict) -> str | None:
    """The key of a training checkpoint (``{"epoch": .., "state_dict": {..}, ..}``) whose value
    is the model's ``state_dict``, when exactly one entry holds a dict of tensors."""
    entries = [key for key, value in loaded.items() if is_tensor_dict(value)]
    return entries[0] if len(entries) == 1 and not is_tensor_dict(loaded) else None


def state_dict_mismatch(model: nn.Module, loaded: dict, path: Path, dataset: str) -> str | None:
    """Why ``loaded`` is not a ``state_dict`` of ``model`` (keys missing, unexpected, shapes
    that differ, values that are not tensors), in one line; None when it is one."""
    expected = model.state_dict()
    if isinstance(loaded, nn.Module):
        return (
            f"{path} is a whole {type(loaded).__name__}, not a state_dict; drop --model to load it"
        )
    if not isinstance(loaded, dict):
        return f"{path} holds a {type(loaded).__name__}, not a state_dict"
    entry = checkpoint_entry(loaded)
    if entry is not None:
        return (
            f"{path} is a training checkpoint (entries {', '.join(map(repr, list(loaded)[:6]))}), "
            f"not a state_dict: its weights are under {entry!r}; pass --state-dict-key {entry}"
        )
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    shapes = [
        f"{key} is {tuple(loaded[key].shape)} in the file, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if isinstance(loaded.get(key), torch.Tensor) and loaded[key].shape != value.shape
    ]
    present = {
        key: loaded[key]
        for key, value in expected.items()
        if isinstance(loaded.get(key), torch.Tensor)
        and loaded[key].shape == value.shape
        and value.is_floating_point()
    }
    # an integer, boolean or complex entry for a float weight: load_state_dict casts it (the
    # fractions of an integer copy truncated to 0; a complex one's imaginary part dropped)
    not_real = [f"{k} {v.dtype}" for k, v in present.items() if not v.is_floating_point()]
    # a float64 value beyond float32's range: infinite once loaded (reported as NaN)
    beyond = [
        f"{key} holds {float(value.abs().max()):.3g}"
        for key, value in present.items()
        if value.is_floating_point()
        and bool((torch.isfinite(value) & (value.abs() > FLOAT32_MAX)).any())
    ]
    problems = []
    for what, keys in (
        ("not tensors", not_tensors),
        ("missing", missing),
        ("unexpected", unexpected),
        ("not of a float dtype", not_real),
        ("beyond float32's range (3.4e38)", beyond),
    ):
        if keys:
            shown = ", ".join(map(str, keys[:4])) + (", ..." if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {what} ({shown})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape ({'; '.join(shapes[:2])})")
    if not problems:
        return None
    prefixes = {str(key).split(".", 1)[0] + "." for key in unexpected if "." in str(key)}
    if len(prefixes) == 1 and len(unexpected) == len(loaded):
        hint = (
            f"; every key starts with {next(iter(prefixes))!r}: save the inner module's state_dict"
        )
    elif missing or unexpected:
        hint = (
            "; it is the state_dict of another model: give --model the dataset it was trained "
            "for, or save the whole nn.Module"
        )
    elif shapes:
        hint = "; the same layers at other sizes: another model, or give the --input-shape it had"
    elif not_real or beyond:
        hint = (
            "; the runtime trains float32 weights: save the state_dict of the float model (not "
            "a quantized, integer or complex copy)"
        )
    else:
        hint = "; a state_dict holds tensors only"
    return f"{path} does not fit the {dataset} reference model: keys " + ", ".join(problems) + hint
