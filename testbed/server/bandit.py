"""Multi-armed bandits for configuration choices (DropPEFT's dropout-ratio configurator)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class Bandit:
    """Tracks rewards per arm and picks the next arm by `policy`: ucb1, epsilon or thompson."""

    arms: int
    policy: str = "ucb1"
    epsilon: float = 0.1
    ucb_c: float = 1.0
    counts: list[int] = field(default_factory=list)
    sums: list[float] = field(default_factory=list)
    squares: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * self.arms
        self.sums = self.sums or [0.0] * self.arms
        self.squares = self.squares or [0.0] * self.arms

    def select(self, rng: random.Random, allowed: list[int]) -> int:
        untried = [a for a in allowed if self.counts[a] == 0]
        if untried:
            return rng.choice(untried)  # in random order, so that devices try different arms at once
        if self.policy == "epsilon":
            return rng.choice(allowed) if rng.random() < self.epsilon else max(allowed, key=self.mean)
        if self.policy == "thompson":
            return max(allowed, key=lambda a: rng.gauss(self.mean(a), self.spread(a) / math.sqrt(self.counts[a])))
        total = sum(self.counts[a] for a in allowed)
        return max(allowed, key=lambda a: self.mean(a) + self.ucb_c * self.spread_all()
                   * math.sqrt(2 * math.log(total) / self.counts[a]))

    def update(self, arm: int, reward: float) -> None:
        self.counts[arm] += 1
        self.sums[arm] += reward
        self.squares[arm] += reward * reward

    def mean(self, arm: int) -> float:
        return self.sums[arm] / self.counts[arm] if self.counts[arm] else 0.0

    def spread(self, arm: int) -> float:
        n = self.counts[arm]
        var = self.squares[arm] / n - self.mean(arm) ** 2 if n else 0.0
        return math.sqrt(max(var, 0.0)) or self.spread_all()

    def spread_all(self) -> float:
        """Reward scale across all arms, so the exploration bonus is in the rewards' units."""
        n = sum(self.counts)
        if n < 2:
            return 1.0
        mean = sum(self.sums) / n
        return math.sqrt(max(sum(self.squares) / n - mean * mean, 0.0)) or 1e-9
