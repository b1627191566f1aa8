"""Shared pieces for the evaluation tests: tiny models and a small real editor registered in-process."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kedit_core
from kedit_core import Deltas, EditResult, Editor, HyperParams
from kedit_core.testing import save_tiny_model, tiny_model
from kedit_core.tracing import Trace


@dataclass(frozen=True)
class NudgeHParams(HyperParams):
    strength: float = 30.0


class UnembedNudge(Editor):
    """Raises the first target token's logit after each request's prompt by ``strength`` (a rank-one update
    of the unembedding rows: the sample plugin's idea), enough to flip ES on a random model."""

    name = "eval-test-nudge"
    HParams = NudgeHParams

    def compute(self, model, requests, context):
        tok, adapter = model.tokenizer, model.adapter
        weight = adapter.unembedding.weight
        delta = torch.zeros_like(weight, dtype=torch.float32)
        for req in requests:
            ids = tok(req.filled_prompt, return_tensors="pt").to(model.device)
            with torch.no_grad(), Trace(model.model, adapter.final_norm_name) as tr:
                model.model(**ids)
            h = tr.output_tensor[0, -1].float()
            first = tok(req.target_new, add_special_tokens=False)["input_ids"][0]
            delta[first] += self.hparams.strength * h / h.dot(h)
        return EditResult(Deltas({adapter.unembedding_name + ".weight": delta.to(weight.dtype)}),
                          info={"num_rows": len(requests)})


class NudgePlugin:
    @kedit_core.hookimpl
    def register_editors(self, register):
        register(UnembedNudge)


@pytest.fixture
def nudge_editor():
    from kedit_core.plugins import registered_plugin

    with registered_plugin(NudgePlugin(), name="eval-test-nudge"):
        yield UnembedNudge.name


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", num_layers=2, hidden_size=64)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_layers=2, hidden_size=64)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return save_tiny_model("gpt2", tmp_path_factory.mktemp("models") / "tiny-gpt2", num_layers=2, hidden_size=64)
