"""Units on a Dask cluster give exactly what they give one after another in this process (the sweep on a
cluster: tests/test_sweep_flow.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from conftest import LENIENT_GATE, copy_project, tiny_params
from desensitize.config import ComputeParams
from desensitize.errors import DesensitizeError
from desensitize.release import read_release_info
from desensitize.runtime.compute import SCHEDULER_ENV, cluster_kwargs, executor, scheduler
from desensitize.stages.masks import generate_masks

CLUSTER = ComputeParams(scheduler="local", workers=2, threads=1)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module


def _with(params, compute: ComputeParams):
    return params.model_copy(update={"compute": compute})


def _draw(seed: int) -> float:
    """A seeded unit: its result depends on its argument only."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return float(torch.randn(256, 256, generator=generator).matmul(torch.randn(256, 256, generator=generator)).sum())


def _dies_once(marker_dir: str, unit: int) -> tuple[int, float]:
    """Kills the worker process that runs unit 1 the first time (as an out-of-memory kill would)."""
    marker = Path(marker_dir) / f"attempt-{unit}"
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if unit == 1 and attempts == 1:
        os._exit(1)
    return attempts, _draw(unit)


def test_the_scheduler_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv(SCHEDULER_ENV, "tcp://10.0.0.1:8786")
    assert scheduler(ComputeParams()) == "tcp://10.0.0.1:8786"
    monkeypatch.setenv(SCHEDULER_ENV, "nowhere")
    with pytest.raises(DesensitizeError, match=f"{SCHEDULER_ENV}='nowhere'"):
        scheduler(ComputeParams())
    monkeypatch.delenv(SCHEDULER_ENV)
    assert scheduler(ComputeParams()) == "local"
    assert cluster_kwargs(ComputeParams(workers=3))["n_workers"] == 3


def test_a_scheduler_address_of_an_unknown_scheme_is_one_clean_error(monkeypatch):
    """As for `bogus`: the variable named, what is expected, before any Dask client is made."""
    monkeypatch.setenv(SCHEDULER_ENV, "foo://bar")
    with pytest.raises(DesensitizeError, match=rf"{SCHEDULER_ENV}='foo://bar': expected local, sync or a scheduler"):
        with executor(ComputeParams()) as ex:
            ex.map(_draw, [1, 2])


def _threads(unit: int) -> int:
    import torch

    return torch.get_num_threads()


def test_threads_beyond_the_cores_are_capped_at_the_cores_with_a_warning(monkeypatch, caplog):
    """compute.threads 1000 on 2 cores: each unit runs with 2 torch threads (what compute.threads 2 gives),
    and the log says so; within the cores the setting is taken as it is, without a word."""
    import desensitize.runtime.compute as compute

    monkeypatch.setattr(compute, "cores", lambda: 2)
    with caplog.at_level("WARNING", logger="desensitize.runtime.compute"):
        with executor(ComputeParams(scheduler="sync", threads=1)) as ex:
            assert ex.map(_threads, [0, 1]) == [1, 1]
        assert not caplog.records
        with executor(ComputeParams(scheduler="sync", threads=1000)) as ex:
            assert ex.map(_threads, [0, 1]) == [2, 2]
    assert "compute.threads = 1000 is more than the 2 CPU cores" in caplog.text
    assert "capped at 2" in caplog.text


def test_units_on_a_local_cluster_equal_the_sequential_results(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV)
    units = [3, 1, 2, 0]
    finished = []
    with executor(ComputeParams(scheduler="sync", threads=1)) as ex:
        sequential = ex.map(_draw, units)
    with executor(CLUSTER) as ex:
        clustered = ex.map(_draw, units, done=lambda i, r: finished.append(i))
        assert ex.where == "local" and len(ex._client.scheduler_info()["workers"]) == 2
    assert clustered == sequential  # bit for bit, in the order of the units
    assert sorted(finished) == [0, 1, 2, 3]


def test_a_unit_whose_worker_dies_is_run_again_with_the_same_result(monkeypatch, tmp_path):
    monkeypatch.delenv(SCHEDULER_ENV)
    units = [0, 1, 2]
    with executor(CLUSTER) as ex:
        results = ex.map(lambda u: _dies_once(str(tmp_path), u), units)
    assert [attempts for attempts, _ in results] == [1, 2, 1]  # unit 1 ran again, on a fresh worker
    with executor(ComputeParams(scheduler="sync", threads=1)) as ex:
        assert [value for _, value in results] == ex.map(_draw, units)


def _nested(unit: int) -> tuple[str, list[float]]:
    """A unit that maps units of its own (a sweep point running a mask search)."""
    with executor(CLUSTER) as inner:
        return inner.where, inner.map(_draw, [unit, unit + 1])


def test_units_a_unit_starts_run_in_its_process(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV)
    with executor(CLUSTER) as ex:
        results = ex.map(_nested, [0, 2])
    with executor(ComputeParams(scheduler="sync", threads=1)) as ex:
        expected = ex.map(_draw, [0, 1, 2, 3])
    assert [where for where, _ in results] == ["sync", "sync"]  # no cluster inside a worker
    assert [v for _, values in results for v in values] == expected


def test_a_unit_error_reaches_the_caller(monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV)

    def refuse(unit: int) -> int:
        if unit == 1:
            raise DesensitizeError("unit 1: bad input")
        return unit

    with executor(CLUSTER) as ex, pytest.raises(DesensitizeError, match="unit 1: bad input"):
        ex.map(refuse, [0, 1, 2])


@pytest.mark.slow
def test_a_mask_search_on_a_local_cluster_equals_the_sequential_search(tiny_project, tmp_path, monkeypatch):
    monkeypatch.delenv(SCHEDULER_ENV)
    params = tiny_params(privacy="gate", attack={"thresholds": LENIENT_GATE})
    records, shards = [], []
    for name, compute in (("sync", ComputeParams(scheduler="sync", threads=1)), ("local", CLUSTER)):
        paths = copy_project(tiny_project, tmp_path / name)
        masks = generate_masks(_with(params, compute), paths, device="cpu")
        records.append(json.dumps(masks["search"], sort_keys=True))
        shards.append([e.sha256 for split in read_release_info(paths.release).shards.values() for e in split])
    assert len(json.loads(records[0])["candidates"]) > 1  # a real search: several candidates, each a unit
    assert records[0] == records[1]  # every utility, screen and full-gate score, and the chosen candidate
    assert shards[0] == shards[1]  # the same release, byte for byte
    assert np.all([len(s) > 0 for s in shards])
