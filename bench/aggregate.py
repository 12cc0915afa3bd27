"""Time `testbed.server.aggregate.aggregate` on MiniLM-sized LoRA as the number of updates grows.

6 layers x (query, value), hidden 384, rank 8, every update covering every layer.
Run from the repository root: `PYTHONPATH=. python bench/aggregate.py [--quick]`.
Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from testbed.core.plan import LayerState, LoraState
from testbed.server.aggregate import Contribution, aggregate

LAYERS, HIDDEN, RANK = 6, 384, 8
MODULES = ("attention.self.query", "attention.self.value")
METHODS = ("fedavg", "flexlora")


def random_layer(gen: torch.Generator) -> LayerState:
    state = {}
    for module in MODULES:
        state[f"{module}.A"] = torch.randn(RANK, HIDDEN, generator=gen)
        state[f"{module}.B"] = torch.randn(HIDDEN, RANK, generator=gen)
    return state


def median_ms(current: LoraState, per_layer: dict[int, list[Contribution]], method: str,
              repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        aggregate(current, per_layer, method)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (under 30 s)")
    # One thread by default: with more threads than idle cores, LAPACK's SVD slows down ~100x.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts, repeats = ((1, 4, 16), 3) if args.quick else ((1, 4, 16, 64), 5)

    gen = torch.Generator().manual_seed(0)
    current = {layer: random_layer(gen) for layer in range(LAYERS)}
    results: dict[str, dict[str, float]] = {method: {} for method in METHODS}
    print(f"{'method':<10}{'updates':>8}{'median ms':>12}{'ms/update':>12}")
    for n in counts:
        per_layer = {layer: [Contribution(float(i + 1), random_layer(gen)) for i in range(n)]
                     for layer in range(LAYERS)}
        for method in METHODS:
            ms = median_ms(current, per_layer, method, repeats)
            results[method][str(n)] = round(ms, 3)
            print(f"{method:<10}{n:>8}{ms:>12.2f}{ms / n:>12.3f}")
    per_update = {method: {n: round(ms / int(n), 3) for n, ms in by_n.items()}
                  for method, by_n in results.items()}
    # Cost of one more update, from the smallest to the largest count (fixed costs cancel).
    first, last = counts[0], counts[-1]
    marginal = {method: round((by_n[str(last)] - by_n[str(first)]) / (last - first), 3)
                for method, by_n in results.items()}
    print("marginal ms per extra update:", marginal)
    print(json.dumps({"bench": "aggregate", "layers": LAYERS, "modules": list(MODULES),
                      "hidden": HIDDEN, "rank": RANK, "repeats": repeats,
                      "threads": torch.get_num_threads(), "median_ms": results,
                      "ms_per_update": per_update, "marginal_ms_per_update": marginal}))


if __name__ == "__main__":
    main()
