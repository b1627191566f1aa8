"""Shared fixtures for the fine-tuning editors' tests: tiny random models (built once per session; the
editors never change them, and tests that apply deltas revert them) and a few CounterFact requests."""
import pytest
import torch

import kedit_core as kedit
from kedit_core.testing import tiny_model

from .helpers import DATA


@pytest.fixture(scope="session")
def gpt2():
    return tiny_model("gpt2", num_layers=2, hidden_size=32)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama", num_layers=2, hidden_size=32)


@pytest.fixture(scope="session")
def gpt2_bf16():
    return tiny_model("gpt2", num_layers=2, hidden_size=32, dtype=torch.bfloat16)


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def requests_cf():
    return kedit.load_requests(DATA / "counterfact_dev.json", limit=4)
