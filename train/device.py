"""Which device a peer trains on, and the numeric precision that goes with it.

CUDA peers train in bf16 autocast (fast, and bf16 needs no loss scaling); CPU peers stay in
float32, where autocast would gain little and make results depend on the CPU's bf16 path.
The outer step is always float32 on the CPU (see optim/outer.py), so mixing the two kinds
of peers in one run is fine.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' → a torch.device that exists on this machine.
    'auto' picks CUDA when present; asking for CUDA without one is an error rather than a
    silent fall-back to a CPU run that would be many times slower than the user expects."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def autocast_context(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA, plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
