"""Checkpoints: atomic training snapshots, safetensors exports and RNG state.

A training checkpoint is a ``torch.save`` file holding only tensors, plain containers,
numbers and strings, so it loads with ``torch.load(path, weights_only=True)``:
``{"format": "dmmi-checkpoint", "version": 1, "model", "optimizer", "scheduler", "extra"}``.
It is written to a temporary file in the same folder, fsynced and renamed over ``path``,
so an interrupted save never leaves a broken file at ``path``.

An exported model is a safetensors file with string metadata (preset, resolved config).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from dmmi.errors import DmmiError

FORMAT = "dmmi-checkpoint"
VERSION = 1
_SCALARS = (str, int, float, bool, type(None))  # exact types: numpy scalars subclass float
_TORCH_PLAIN = (torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in _SCALARS or isinstance(obj, _TORCH_PLAIN):
        return
    if isinstance(obj, dict):  # dict, OrderedDict (state dicts)
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise DmmiError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}; only str / int keys are allowed")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise DmmiError(
        f"checkpoint {where}: a {type(obj).__name__} cannot be stored; use tensors, dicts, lists, numbers "
        f"and strings (e.g. config.to_dict(), capture_rng_state())"
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it (no window for other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it, rename it to ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise DmmiError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp's 0600 would make every model file private to its writer
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a read-only mount: one line, the old file kept
        tmp.unlink(missing_ok=True)
        raise DmmiError(f"cannot write {path}: {e.strerror or e} (the previous {path.name}, if any, is unchanged)") \
            from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def check_writable_folder(folder: str | Path, option: str, named: Optional[str | Path] = None) -> None:
    """One-line DmmiError unless ``folder`` is, or can be made, a folder to write in; creates nothing.

    The nearest part of ``folder`` that exists must be a folder where a file can be created (tried
    with a temporary file, which also catches read-only mounts and ACLs). ``option`` and ``named``
    (default ``folder``) name what the user gave, for the message."""
    folder = Path(folder)
    named = Path(named) if named is not None else folder
    probe = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    if not probe.is_dir():
        raise DmmiError(f"{option} {named}: {'it' if probe == named else probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dmmi-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise DmmiError(f"{option} {named}: cannot write in {probe} ({e.strerror or e})") from None


def slug(text: str, max_bytes: int = 60) -> str:
    """``text`` as a piece of a file name: letters and digits of any script, runs of anything else as
    one ``_``, at most ``max_bytes`` bytes of UTF-8 (cut between characters); "expression" if nothing
    is left. "The small red circle!" -> "the_small_red_circle"."""
    keep = "".join(c if c.isalnum() else "_" for c in text.lower())
    words = "_".join(filter(None, keep.split("_")))
    cut = words.encode("utf-8")[:max_bytes].decode("utf-8", "ignore").strip("_")
    return cut or "expression"


def temporary_files(folder: Path) -> list[Path]:
    """The temporary files :func:`atomic_write` leaves in ``folder`` when its process is killed
    (``kill -9``) mid-write: ``.<name>.<random>.tmp``."""
    return sorted(p for p in Path(folder).glob(".*.tmp") if p.is_file())


def save_checkpoint(
    path: str | Path,
    *,
    model_state: dict,
    optimizer_state: Optional[dict] = None,
    scheduler_state: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write a training checkpoint atomically.

    Args:
        model_state: the model's ``state_dict()`` (unwrap DDP first: no ``module.`` prefix).
        optimizer_state, scheduler_state: their ``state_dict()`` or None.
        extra: plain data, e.g. {"epoch", "step", "config": cfg.to_dict(),
            "rng": capture_rng_state(), "best": {...}}.
    Returns the path written.
    """
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler_state,
        "extra": dict(extra or {}),
    }
    _check_plain(payload, "")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    atomic_write(path, write)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles code).

    Returns {"format", "version", "model", "optimizer", "scheduler", "extra"}.
    Raises DmmiError (one line) for a missing file, a truncated / corrupt / foreign file, or a
    file that would need unsafe unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise DmmiError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text:
            detail = text.split("Unsupported global:", 1)[1].split(" was not", 1)[0].strip()
            raise DmmiError(
                f"{path}: refusing to load: the file needs unsafe unpickling ({detail}); "
                f"only checkpoints of tensors and plain data are accepted"
            ) from None
        raise DmmiError(f"{path} is not a dmmi checkpoint or is truncated") from None
    except Exception as e:  # zip / EOF / key errors from a damaged or foreign file
        raise DmmiError(f"{path} is not a dmmi checkpoint or is truncated ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DmmiError(f"{path} is not a dmmi checkpoint or is truncated (no '{FORMAT}' marker)")
    if data.get("version", 0) > VERSION:
        raise DmmiError(f"{path}: checkpoint version {data['version']} is newer than this dmmi (reads {VERSION})")
    return data


# ---------------------------------------------------------------------------- safetensors


def export_metadata(config: Any) -> dict[str, str]:
    """Metadata for an exported model: {"format": "dmmi", "preset", "config" (JSON)}.

    ``config`` is a :class:`dmmi.config.Config` or its ``to_dict()``.
    """
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"format": "dmmi", "preset": str(d.get("preset", "custom")), "config": json.dumps(d, sort_keys=True)}


def save_weights_safetensors(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``state_dict`` as safetensors, atomically. Tensors that share memory (tied
    weights) or are not contiguous are copied. ``metadata`` values must be strings."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DmmiError(f"safetensors metadata must map str to str; {bad[0]!r} does not (use json.dumps)")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise DmmiError(f"save_weights_safetensors: {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in storages or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None:
            storages.add(ptr)
        tensors[name] = t
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata)))
    return Path(path)


def load_weights_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file: (state_dict, metadata); metadata is {} when absent."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DmmiError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            state = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as e:
        raise DmmiError(f"{path} is not a safetensors file or is truncated ({type(e).__name__})") from None
    return state, metadata


# ---------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict:
    """The state of python ``random``, numpy's global generator and torch (CPU, and every
    CUDA device when present), as tensors and numbers (safe for ``weights_only``)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`: later draws repeat those made after the capture.
    CUDA states are restored for the devices present (the first ones if counts differ)."""
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
        )
        torch.set_rng_state(state["torch"].cpu())
        cuda = state.get("cuda") or []
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DmmiError(f"checkpoint RNG state is malformed ({type(e).__name__}: {e})") from None
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
