"""Training under torchrun (desensitize.runtime.distributed), on CPU with gloo: two processes train what one
process trains, only rank 0 writes, and outside torchrun training is the plain single-process loop.

Each two-process test starts its ranks with torch.multiprocessing.spawn, setting the environment
torchrun would (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from torch import nn

from desensitize.config import ClassifierParams
from desensitize.errors import DesensitizeError
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.learning.training import fit, train_classifier
from desensitize.models import build_backbone
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths
from desensitize.runtime.device import seed_everything
from desensitize.runtime.distributed import process_group

# 97 images in batches of 32: the last global batch holds one image, so one rank's share of it is empty.
CFG = ClassifierParams(epochs=2, batch_size=32, lr=3e-3, weight_decay=1e-4)
# Two ranks sum in another order than one process (batch-norm statistics, the averaged gradients), so
# the weights differ by float32 rounding carried through 8 Adam steps: 5.9e-7 at most, measured. A real
# fault is far above the bound: per-rank batch norm 5.6e-2, each rank's mean loss unweighted 1.6e-2.
TOLERANCE = 1e-5


def _data(n: int = 97) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 60, (n, 1, 12, 12)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 0, 4 * label : 4 * label + 4] += 150
    return images, labels.astype(np.int64)


def _model() -> nn.Module:
    """small_cnn without its dropout, whose draws no two ways of splitting a batch share."""
    seed_everything(0)
    model = build_backbone("small_cnn", 1, 3)
    model.head[2] = nn.Identity()
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, job: Callable[..., None], *args: object) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    with process_group():
        job(rank, *args)


def _two_ranks(job: Callable[..., None], *args: object) -> None:
    torch.multiprocessing.spawn(_rank, args=(_free_port(), job, *args), nprocs=2)


def _train(rank: int, out: Path) -> None:
    model = _model()
    history = train_classifier(model, *_data(), CFG, seed=0, device=torch.device("cpu"))
    torch.save({"state": model.state_dict(), "history": history.epochs}, out / f"rank{rank}.pt")


def test_two_processes_train_what_one_process_trains(tmp_path: Path):
    _two_ranks(_train, tmp_path)
    model = _model()
    history = train_classifier(model, *_data(), CFG, seed=0, device=torch.device("cpu"))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # replicas stay equal
        difference = (ranks[0]["state"][name].double() - value.double()).abs().max().item()
        assert difference <= TOLERANCE, (name, difference)
    assert ranks[0]["history"] == ranks[1]["history"]  # the logged figures are the global ones
    for two, one in zip(ranks[0]["history"], history.epochs, strict=True):
        assert two["train_accuracy"] == one["train_accuracy"]
        assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)


def test_outside_torchrun_training_is_the_single_process_loop():
    """Bit for bit the loop train_classifier ran before it learned DDP."""
    images, labels = _data()
    model = _model()
    train_classifier(model, images, labels, CFG, seed=0, device=torch.device("cpu"))

    expected = _model()
    generator = seed_everything(0)
    x_all, y_all = torch.from_numpy(images).float().div_(255), torch.from_numpy(labels)
    expected.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(expected.parameters(), lr=CFG.lr, weight_decay=CFG.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=CFG.lr, total_steps=8, pct_start=0.15)
    for _ in range(CFG.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for i in range(0, len(order), CFG.batch_size):
            idx = order[i : i + CFG.batch_size]
            loss = nn.CrossEntropyLoss()(expected(x_all[idx].contiguous(memory_format=torch.channels_last)), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    for name, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def _writes_under(root: Path, log: list[str]) -> None:
    """Record every file this process opens for writing, creates, renames or removes under `root`."""
    root = str(root.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = (
                any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            )
            if writes and os.path.abspath(args[0]).startswith(root):
                log.append(f"open {args[0]}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "tempfile.mkstemp") and args:
            if os.path.abspath(os.fsdecode(args[0])).startswith(root):
                log.append(f"{event} {args[0]}")

    sys.addaudithook(hook)


def _fit(rank: int, root: Path, out: Path) -> None:
    writes: list[str] = []
    _writes_under(root, writes)
    images, labels = _data()
    model, _ = fit(
        CFG,
        images,
        labels,
        ["a", "b", "c"],
        seed=0,
        masknet=False,
        device=torch.device("cpu"),
        model_path=root / "models" / "m.npz",
        history_path=root / "plots" / "m.csv",
        name="m",
    )
    torch.save({"state": model.state_dict(), "writes": writes}, out / f"rank{rank}.pt")


def test_only_rank_zero_writes(tmp_path: Path):
    root, out = tmp_path / "project", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    _two_ranks(_fit, root, out)
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["writes"], "the audit hook saw no write of rank 0"
    assert ranks[1]["writes"] == []
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "models/m.npz",
        "plots/m.csv",
    ]
    saved, _ = load_checkpoint(root / "models" / "m.npz")
    for name, value in saved.state_dict().items():
        assert torch.equal(value, ranks[0]["state"][name]), name


@pytest.mark.slow
def test_torchrun_runs_a_training_stage_with_rank_zero_tracking_it(tiny_project, tmp_path: Path):
    """The real launch: `torchrun --nproc-per-node 2 -m desensitize reference` on CPU (gloo)."""
    from conftest import copy_project, tiny_params

    paths = copy_project(tiny_project, tmp_path / "project")
    paths.reference_model.unlink()
    (paths.root / "params.yaml").write_text(yaml.safe_dump(tiny_params().model_dump(mode="json")))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*launch, "-m", "desensitize", "reference", "--device", "cpu"],
        cwd=paths.root,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model, _ = load_checkpoint(paths.reference_model)
    assert model.stages[0][1].__class__ is nn.BatchNorm2d  # the checkpoint rebuilds the plain model
    assert paths.report("reference").is_file() and paths.reference_history.is_file()
    assert not [p for p in paths.root.rglob("*.tmp")]
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [(run.data.tags["desensitize.stage"], run.info.status) for run in runs] == [("reference", "FINISHED")]


@pytest.mark.parametrize("stage", ["ingest", "masks", "attack", "evaluate", "register"])
def test_stages_that_do_not_train_refuse_several_processes(stage: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    from conftest import tiny_params

    with pytest.raises(DesensitizeError, match=rf"stage '{stage}' runs in one process.*`desensitize {stage}`"):
        run_stage(stage, tiny_params(), Paths(tmp_path))
    assert not any(tmp_path.iterdir())
