"""Fake (meta) implementations of kedit's compiled ops that return new tensors: output shapes and dtypes
only, so the ops work under FakeTensor tracing (``torch.compile``, ``torch.library.opcheck``)."""
from __future__ import annotations

import torch


@torch.library.register_fake("kedit::gather_segment_sum")
def _gather_segment_sum_fake(hidden, rows, positions, segments, weights, num_segments):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty((num_segments, hidden.shape[-1]), dtype=acc)


@torch.library.register_fake("kedit::spd_factor")
def _spd_factor_fake(a):
    return torch.empty_like(a)


@torch.library.register_fake("kedit::spd_solve")
def _spd_solve_fake(a, b):
    return torch.empty_like(b)


@torch.library.register_fake("kedit::spd_woodbury_solve")
def _spd_woodbury_solve_fake(factor, k, alpha=1.0):
    return torch.empty_like(k)
