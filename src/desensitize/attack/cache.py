"""The attack cache: a full attack-suite result kept by the digest of everything it depends on, so the
attack stage finds the run the mask search made on the candidate it released instead of attacking it
a second time (`.cache/attack/`, not versioned; delete it to attack afresh)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from desensitize.attack.inpainting import AttackerData
from desensitize.attack.suite import Target, attack_suite
from desensitize.config import AttackParams
from desensitize.storage import atomic_path

CACHE_KEEP = 8  # results kept in the attack cache, newest first


def suite_digest(target: Target, attacker: AttackerData, fill: Callable, cfg: AttackParams, **kwargs: Any) -> str:
    """sha256 of everything attack_suite's result depends on: the target and attacker arrays, a draw of
    the fill, the attack params, the reference model's weights, the device type and the other arguments."""
    h = hashlib.sha256()
    arrays = [
        target.released,
        target.masks,
        target.raw,
        target.labels,
        attacker.images,
        attacker.known,
        attacker.labels,
    ]
    arrays.append(np.asarray(fill((2, *target.raw.shape[1:]), 0)))
    for array in arrays:
        h.update(str((array.dtype, array.shape)).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    ex = kwargs.pop("ex", None)  # where the work runs does not change the result; its torch threads may
    kwargs["threads"] = ex.cfg.threads if ex is not None else torch.get_num_threads()
    model, device = kwargs.pop("model"), kwargs.pop("device")
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().numpy().tobytes())
    h.update(json.dumps([cfg.model_dump(mode="json"), device.type, kwargs], sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_attack_suite(
    cache: Path, target: Target, attacker: AttackerData, fill: Callable, cfg: AttackParams, **kwargs: Any
) -> dict[str, Any]:
    """attack_suite, its result kept under `cache` by suite_digest: the same inputs give the stored result
    (with `cached: True`) instead of a second run. Only the CACHE_KEEP newest results are kept."""
    key = suite_digest(target, attacker, fill, cfg, **kwargs)
    meta, arrays = cache / f"{key}.json", cache / f"{key}.npz"
    if meta.exists() and arrays.exists():
        result = json.loads(meta.read_text())
        with np.load(arrays) as data:
            result["reconstructions"] = {name: data[name] for name in result.pop("reconstruction_order")}
        meta.touch()
        return {**result, "cached": True}
    result = attack_suite(target, attacker, fill, cfg, **kwargs)
    cache.mkdir(parents=True, exist_ok=True)
    recon = result["reconstructions"]
    with atomic_path(arrays) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **recon)
    body = {k: v for k, v in result.items() if k != "reconstructions"}
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps({**body, "reconstruction_order": list(recon)}, default=float))
    for old in sorted(cache.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".npz").unlink(missing_ok=True)
    return {**result, "cached": False}
