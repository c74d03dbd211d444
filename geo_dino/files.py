"""Atomic writes of arrays: a reader (a resumed run, another task) sees the old file or the new one, never
half of one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save_npz(path: Path, arrays: dict[str, Any]) -> Path:
    """Write ``arrays`` to ``path`` (``.npz``) through a temporary file beside it, then rename; return
    ``path``."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(p)
    return p
