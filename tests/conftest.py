"""Shared test set-up: one torch thread (small tensors run ~5x faster without thread contention) and the
2-D mixtures most tests use."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Every test starts on one thread, whatever the previous one set (the demo and the batch runner set their own):
    CPU kernels round differently for different thread counts, so a leaked setting would make results depend on the
    order the tests run in."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def two_mixtures():
    """A = {(-2, 0), (2, 0)} and B = {(2, 0), (0, 3)}, std 0.5, VP-linear: they share the component at (2, 0)."""
    from compose.toy import GaussianMixture

    def make(schedule=None, dtype=None):
        a = GaussianMixture([[-2.0, 0.0], [2.0, 0.0]], 0.5, schedule=schedule, name="A")
        b = GaussianMixture([[2.0, 0.0], [0.0, 3.0]], 0.5, schedule=schedule, name="B")
        return a, b

    return make


MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)


def mode_shares(x: torch.Tensor, modes: torch.Tensor = MODES) -> torch.Tensor:
    """Fraction of samples nearest to each mode."""
    idx = torch.cdist(x.to(torch.float64), modes).argmin(1)
    return torch.bincount(idx, minlength=modes.shape[0]).to(torch.float64) / x.shape[0]
