"""zsRE metrics (MEND's eval split, as ROME/MEMIT evaluate it); reported ×100.

All three are teacher-forced, token-level top-1 accuracies: the answer's tokens are appended to the
question and each position counts as correct when the model's argmax there is the next answer token.
Per record the accuracy is the share of correct answer tokens; the aggregate averages records.

- efficacy: the new answer (``answers[0]``, with a leading space) after the question ``src``;
- paraphrase: the same answer after the rephrased question;
- specificity: the unrelated NQ question ``loc + "?"`` followed by its own answer ``" " + loc_ans``, so
  an unedited model scores what it already knows there (GPT-J ≈ 27), not 100.

The reference builds one prompt per answer token by decoding token prefixes and re-tokenising; scoring
the answer's tokens in one teacher-forced pass reads the same argmax at the same positions without the
decode/encode round trip.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from ..text import score_targets
from .aggregate import aggregate_records
from .datasets import ZsreCase

__all__ = ["ZSRE_METRICS", "score_zsre", "aggregate_zsre"]

ZSRE_METRICS = ("efficacy", "paraphrase", "specificity")


def score_zsre(model, tokenizer, cases: Sequence[ZsreCase], *, max_tokens: int | None = None,
               max_batch: int | None = None, progress: bool = False) -> list[dict]:
    """Per case ``{"case_id", "tokens": {metric: [bool per answer token]}, "metrics": {efficacy,
    paraphrase, specificity}}`` (×100), from one batched teacher-forced pass over all cases."""
    prompts, targets = [], []
    for case in cases:
        prompts += [case.question, case.rephrase, case.loc_prompt]
        targets += [case.request.target_new, case.request.target_new, case.loc_target]
    scores = score_targets(model, tokenizer, prompts, targets, max_tokens=max_tokens, max_batch=max_batch,
                           progress=progress, desc="scoring zsRE")
    out = []
    for c, case in enumerate(cases):
        per = dict(zip(ZSRE_METRICS, scores[3 * c: 3 * c + 3]))
        out.append({"case_id": case.case_id,
                    "tokens": {k: s.token_hits for k, s in per.items()},
                    "metrics": {k: 100.0 * s.token_accuracy for k, s in per.items()}})
    return out


def aggregate_zsre(records: Sequence[Mapping[str, float | None]]) -> dict:
    out = aggregate_records(records, ZSRE_METRICS)
    out["num_records"] = len(records)
    return out
