"""The training rows split among devices (IID or Dirichlet label skew), each with a validation split."""
from __future__ import annotations

import numpy as np

from testbed.core.config import DataConfig
from testbed.core.errors import TestbedError
from testbed.data.records import Shard


def partition(labels: list[int], devices: list[str], cfg: DataConfig, seed: int) -> dict[str, Shard]:
    """IID or Dirichlet(alpha) label-skew shards, each with a local validation split."""
    n, k = len(labels), len(devices)
    if n < k * cfg.min_per_client:
        raise TestbedError(f"devices: {k} devices need at least {k * cfg.min_per_client} training rows "
                           f"(data.min_per_client={cfg.min_per_client}); the data has {n}")
    rng = np.random.default_rng(seed)
    parts = _iid(n, k, rng) if cfg.partition == "iid" else _dirichlet(np.array(labels), k, cfg, rng)
    shards = {}
    for device, idx in zip(devices, parts):
        idx = sorted(int(i) for i in idx)
        rng.shuffle(idx)
        n_val = int(len(idx) * cfg.val_fraction)
        shards[device] = Shard(train=sorted(idx[n_val:]), val=sorted(idx[:n_val]))
    return shards


def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), k)


def _dirichlet(labels: np.ndarray, k: int, cfg: DataConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class is split across devices by Dirichlet(alpha) proportions.

    Redrawn until every device holds at least min_per_client rows (bounded tries).
    """
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(k)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([cfg.alpha] * k)) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= cfg.min_per_client:
            return [np.array(p) for p in parts]
    raise TestbedError(f"data.alpha: no Dirichlet({cfg.alpha}) split gives every one of {k} devices "
                       f"{cfg.min_per_client} rows; raise alpha or lower data.min_per_client")
