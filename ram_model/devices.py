"""Device names in configs: "auto" is CUDA when there is one, else the CPU."""
from __future__ import annotations

import torch


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)
