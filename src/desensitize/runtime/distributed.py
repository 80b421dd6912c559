"""Training across the processes of a `torchrun` launch (torch.distributed, DistributedDataParallel).

torchrun starts one process per rank and tells each its place (WORLD_SIZE, RANK, LOCAL_RANK).
`process_group` joins them for a stage, `Replicas` is the model as `training.train_classifier` trains
it there: every rank draws the same seeded order, takes its share of each global batch, and averages
gradients so that a step is the step one process takes on the whole batch, batch norm included. Only
rank 0 writes. Outside torchrun (or with one process) none of this is active: no process group, the
model trained as it is.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from desensitize.errors import DesensitizeError

BACKEND_ENV = "DESENSITIZE_DIST_BACKEND"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The rank that writes outputs and tracks the run."""
        return self.rank == 0


def world() -> World:
    """This process's place in a torchrun launch; one process of one outside it."""
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    found = {name: os.environ.get(name, default) for name, default in defaults.items()}
    try:
        return World(int(found["RANK"]), int(found["WORLD_SIZE"]), int(found["LOCAL_RANK"]))
    except ValueError:
        raise DesensitizeError(f"torchrun's environment {found}: expected integers") from None


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """Join the launch's process group for the duration (once: inside another, it is that one's): nccl
    when the ranks train on CUDA (`device` auto with a GPU present, or cuda), else gloo, or the backend
    named by DESENSITIZE_DIST_BACKEND. With one process, nothing is set up."""
    here = world()
    if here.size == 1 or dist.is_initialized():
        yield here
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(here.local_rank)
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as exc:
        raise DesensitizeError(f"rank {here.rank} could not join the {backend!r} process group: {exc}") from None
    try:
        yield here
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device) -> torch.device:
    """Each rank of a launch of several processes trains on its own GPU, cuda:LOCAL_RANK."""
    here = world()
    if here.size == 1 or device.type != "cuda":
        return device
    if device.index is not None and device.index != here.local_rank:
        raise DesensitizeError(
            f"device {device} under torchrun: rank {here.rank} uses cuda:{here.local_rank} (LOCAL_RANK); "
            "give --device cuda or auto"
        )
    return torch.device("cuda", here.local_rank)


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, and its gradient: the sum over ranks of the gradients."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class _SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch: each rank's sums are all-reduced, differentiably, so the
    statistics, running averages and gradients are those of one process seeing the whole batch.
    torch's own nn.SyncBatchNorm refuses CPU tensors (gloo), hence this one, on every device."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1, *[1] * (x.dim() - 2))
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), x.new_full((1,), x.numel() // x.size(1))]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)  # two passes, as one process computes the variance
        var = _AllReduceSum.apply(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var * n / (n - 1), alpha=factor)
        return out


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` (on `device`) with every batch norm replaced by a `_SyncBatchNorm` holding the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = _SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, device
        )
        synced.load_state_dict(module.state_dict())
        return synced.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, sync_batch_norm(child, device))
    return module


class Replicas:
    """`model` as train_classifier trains it: itself with one process; under a launch of several, a
    DistributedDataParallel copy with synchronised batch norm, each rank computing its share of every
    global batch, weighted so that the averaged gradient is the whole batch's mean-loss gradient.
    `finish` puts the trained weights back into `model`."""

    def __init__(self, model: nn.Module, device: torch.device, seed: int) -> None:
        self.model, self.world, self.device = model, world(), device
        self.module = model
        self.loss_fn = nn.CrossEntropyLoss()
        if self.world.size == 1:
            return
        if not dist.is_initialized():
            raise DesensitizeError(
                f"launched by torchrun with {self.world.size} processes but no process group: "
                "train inside desensitize.runtime.distributed.process_group()"
            )
        torch.manual_seed(seed + self.world.rank)  # each rank its own dropout; the batch order stays shared
        device_ids = [device.index] if device.type == "cuda" else None
        self.module = DistributedDataParallel(sync_batch_norm(copy.deepcopy(model), device), device_ids=device_ids)
        self.loss_fn = nn.CrossEntropyLoss(reduction="sum")  # a rank's share may be empty: no mean of nothing

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of indices (every world-size-th, from its rank)."""
        return batch[self.world.rank :: self.world.size]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, batch_len: int) -> torch.Tensor:
        """The mean loss over the global batch of `batch_len`: DDP averages over ranks, so each rank's
        summed loss is scaled by world size / batch length."""
        loss = self.loss_fn(logits, labels)
        return loss if self.world.size == 1 else loss * (self.world.size / batch_len)

    def totals(self, loss_sum: float, correct: int) -> tuple[float, int]:
        """An epoch's summed loss (as train_classifier adds up `loss * batch length`) and correct count
        over every rank."""
        if self.world.size == 1:
            return loss_sum, correct
        both = torch.tensor([loss_sum / self.world.size, correct], dtype=torch.float64, device=self.device)
        dist.all_reduce(both)
        return both[0].item(), int(both[1].item())

    def finish(self) -> None:
        if self.module is not self.model:
            self.model.load_state_dict(self.module.module.state_dict())
