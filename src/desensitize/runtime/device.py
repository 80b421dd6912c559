"""Where tensors live and how runs start: the device (CUDA when present), seeding, progress bars, and
moving images and models to the device in the layout its convolutions run fastest in."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from desensitize.errors import DesensitizeError
from desensitize.runtime.distributed import rank_device

T = TypeVar("T")


def best_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error, not a silent fallback.
    Under torchrun with several processes, each rank's CUDA device is cuda:LOCAL_RANK."""
    if requested == "auto":
        return rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DesensitizeError(f"device {requested!r} requested but CUDA is not available on this machine")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DesensitizeError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N") from None
    return rank_device(device)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on a terminal; nothing otherwise (callers log periodic lines instead)."""
    return iter(tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty()))


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device` in channels-last layout, which oneDNN and cuDNN run fastest for convolutions."""
    return model.to(device=device, memory_format=torch.channels_last)


def batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, memory_format=torch.channels_last) if x.dim() == 4 else x.to(device)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.float().div_(255) if tensor.dtype == torch.uint8 else tensor.float()
