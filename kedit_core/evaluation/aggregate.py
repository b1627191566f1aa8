"""Averaging per-record metrics into the numbers reports show."""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

__all__ = ["mean", "harmonic_mean", "aggregate_records"]


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def std(values: Iterable[float]) -> float | None:
    """Population standard deviation (numpy's default, as the reference's summaries use)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of non-negative numbers; 0 if any is 0, None if any is missing."""
    if any(v is None for v in values) or not values:
        return None
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def aggregate_records(records: Sequence[Mapping[str, float | None]], keys: Sequence[str]) -> dict:
    """For each key, the mean over the records that have it (records where a metric is undefined, e.g.
    RS without reference texts, hold None and are left out), the standard deviation and the count."""
    out: dict = {}
    for key in keys:
        values = [r.get(key) for r in records]
        out[key] = mean(values)
        out[f"{key}_std"] = std(values)
        out[f"{key}_n"] = sum(v is not None for v in values)
    return out
