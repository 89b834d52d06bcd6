"""Rebuild the deterministic weights of ../shared/parity/README.md under the authors' names."""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

# ../shared/parity beside the repository (as CI lays it out), or DMMI_PARITY_DIR
PARITY_DIR = Path(os.environ.get("DMMI_PARITY_DIR") or Path(__file__).resolve().parents[2] / "shared" / "parity")


def parity_file(name: str) -> Path:
    path = PARITY_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"parity test vector {path} is missing: shared/parity must lie beside the "
                                "repository (or set DMMI_PARITY_DIR)")
    return path


def authors_keys(variant: str) -> list:
    return json.loads(parity_file(f"keys_{variant}.json").read_text())


def _is_norm_weight(name: str) -> bool:
    module, leaf = name.rsplit(".", 1)
    return leaf == "weight" and re.fullmatch(r"norm\d*|bn\d*(_\d+)?", module.rsplit(".", 1)[-1]) is not None


def deterministic_authors_state(variant: str = "swin_t") -> dict:
    """{authors' name: tensor} built with the README's formula (integer buffers skipped)."""
    state = {}
    for name, shape, dtype in authors_keys(variant):
        if dtype != "float32":
            continue
        z = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(shape).astype(np.float32)
        if name.endswith("running_var"):
            v = 1 + 0.1 * np.abs(z)
        elif name.endswith("running_mean"):
            v = 0.1 * z
        elif _is_norm_weight(name) or name.endswith(("vis_weight", "lan_weight")):
            v = 1 + 0.1 * z
        else:
            v = 0.02 * z
        state[name] = torch.from_numpy(np.asarray(v, dtype=np.float32))
    return state
