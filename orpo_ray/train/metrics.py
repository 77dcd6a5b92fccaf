"""Micro-batch metric averaging, all-reducible across ranks (one tensor of sums and counts)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


class MetricAverager:
    """Mean of each metric over the ``add`` calls that reported it (one call per micro-batch), weighted by ``weight``.

    Values may be floats or 0-d tensors; tensors are accumulated as detached tensors, so ``add`` never forces
    a device sync — only ``compute`` / ``as_tensor`` do.

    Across ranks: ``t = avg.as_tensor(names)``; ``all_reduce(t, SUM)``; ``MetricAverager.from_tensor(t, names)
    .compute()``. Every rank must pass the same ``names`` (e.g. ``Objective.metric_names``).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor | float] = {}
        self._counts: dict[str, float] = {}

    def add(self, metrics: Mapping[str, Tensor | float], weight: float = 1.0) -> None:
        """Accumulate one micro-batch; `weight` (e.g. its number of pairs) makes a short last batch count less."""
        for name, value in metrics.items():
            if isinstance(value, Tensor):
                value = value.detach().to(torch.float64).reshape(())
            self._sums[name] = self._sums.get(name, 0.0) + value * weight
            self._counts[name] = self._counts.get(name, 0) + weight

    def compute(self) -> dict[str, float]:
        """Means as python floats, for the metrics seen at least once."""
        return {k: float(self._sums[k]) / self._counts[k] for k in self._sums}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()

    def as_tensor(self, names: Sequence[str] | None = None, device: torch.device | str | None = None) -> Tensor:
        """fp64 [2 * len(names)] = sums then counts, in ``names`` order (default: sorted seen names), on ``device``
        (default: the device of the tensors added, else the CPU).

        Unseen names contribute sum 0 and count 0, so ranks that skipped a metric still reduce correctly.
        """
        names = sorted(self._sums) if names is None else list(names)
        if device is None:  # where the sums are: a GPU worker's metrics stay on its GPU until reduced
            device = next((v.device for v in self._sums.values() if isinstance(v, Tensor)), "cpu")
        sums = [torch.as_tensor(self._sums.get(k, 0.0), dtype=torch.float64).to(device) for k in names]
        counts = torch.tensor([self._counts.get(k, 0) for k in names], dtype=torch.float64, device=device)
        return torch.cat([torch.stack(sums) if sums else counts.new_zeros(0), counts])

    @classmethod
    def from_tensor(cls, packed: Tensor, names: Sequence[str]) -> "MetricAverager":
        """Inverse of ``as_tensor`` (typically after a SUM all-reduce)."""
        names = list(names)
        if packed.numel() != 2 * len(names):
            raise ValueError(f"packed tensor has {packed.numel()} entries, expected {2 * len(names)}")
        values = packed.detach().to("cpu", torch.float64).tolist()
        avg = cls()
        for i, name in enumerate(names):
            count = values[len(names) + i]
            if count > 0:  # a metric no rank reported stays absent rather than becoming 0/0
                avg._sums[name], avg._counts[name] = values[i], count
        return avg
