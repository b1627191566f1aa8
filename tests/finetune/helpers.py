"""Helpers for the fine-tuning tests."""
from pathlib import Path

import torch

from kedit_core.text import mean_target_nll, prompt_target_batch

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "data"
COUNTERFACT = DATA / "counterfact_dev.json"


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, snap, names=None):
    for n, p in model.named_parameters():
        if names is None or n in names:
            assert p.dtype == snap[n].dtype and torch.equal(p, snap[n]), f"{n} changed"


@torch.no_grad()
def target_nll(loaded, requests):
    """Each request's mean per-token NLL of its new target after its prompt (teacher forced)."""
    enc = prompt_target_batch(loaded.tokenizer, [r.filled_prompt for r in requests],
                              [r.target_new for r in requests], include_last_target_token=False)
    logits = loaded.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    return mean_target_nll(logits, enc.labels).tolist()


def applied_weights(loaded, deltas):
    """The model's parameters with ``deltas`` applied (the model is restored afterwards)."""
    with deltas.apply(loaded.model, check_fingerprint=False):
        return snapshot(loaded.model)
