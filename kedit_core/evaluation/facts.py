"""The seed papers' metrics on sets of facts: a fact is a prompt and its target, and the model "knows"
it when every target token is the argmax under teacher forcing (:attr:`TargetScore.correct`).

- Zhu et al. 2020 (constrained fine-tuning): ``A_M``, the accuracy on the modified facts M (with their
  new targets); ``A_{F\\S}``, the accuracy on the facts that were not modified; ``Ā = (A_M + A_{F\\S}) / 2``.
- Ni et al. (F-Learning): reliability = accuracy on the new facts; generality = accuracy on their
  equivalent rephrasings; locality = the share of unrelated facts whose predicted target tokens did not
  change from before the edit to after it.
- EasyEdit's locality: the agreement of the pre- and post-edit argmax tokens over the target positions
  of unrelated prompts, averaged per prompt, then over prompts (:func:`token_agreement`).

All results are percentages (×100). Targets are scored exactly as given: write ``" Paris"`` when the
word follows a space (:meth:`Fact.from_request` takes the request's ``target_new``, which has one).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from ..text import TargetScore, score_targets

__all__ = ["Fact", "predict_facts", "accuracy", "locality", "token_agreement", "RetentionMetrics", "retention_metrics",
           "FLearningMetrics", "FactProbe"]


@dataclass(frozen=True)
class Fact:
    """A prompt and the target that should follow it, e.g. ``Fact("The Eiffel Tower is in", " Paris")``."""

    prompt: str
    target: str

    @classmethod
    def from_request(cls, request, *, target: str = "new") -> "Fact":
        """The fact an :class:`~kedit_core.requests.EditRequest` writes (``target="new"``) or replaces
        (``"true"``)."""
        value = request.target_new if target == "new" else request.target_true
        if value is None:
            raise ValueError(f"request {request.case_id!r} has no target_{target}")
        return cls(request.filled_prompt, value)


def _module_and_tokenizer(model, tokenizer):
    from ..models import LoadedModel

    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer
    if tokenizer is None:
        raise ValueError("pass tokenizer= with a bare model (or pass a kedit_core.LoadedModel)")
    return model, tokenizer


def predict_facts(model, facts: Sequence[Fact], tokenizer=None, *, max_tokens: int | None = None,
                  progress: bool = False) -> list[TargetScore]:
    """Teacher-forced scores of every fact in padded batches. ``model`` is a
    :class:`~kedit_core.LoadedModel`, or a Hugging Face module with ``tokenizer`` given."""
    module, tok = _module_and_tokenizer(model, tokenizer)
    facts = list(facts)
    if not facts:
        return []
    return score_targets(module, tok, [f.prompt for f in facts], [f.target for f in facts], max_tokens=max_tokens,
                         progress=progress, desc="scoring facts")


def accuracy(scores: Sequence[TargetScore]) -> float | None:
    """Share of facts whose whole target is the argmax, ×100 (None for no facts)."""
    if not scores:
        return None
    return 100.0 * sum(s.correct for s in scores) / len(scores)


def _check_paired(pre: Sequence[TargetScore], post: Sequence[TargetScore]) -> None:
    if len(pre) != len(post):
        raise ValueError(f"{len(pre)} pre-edit predictions but {len(post)} post-edit ones")
    for i, (a, b) in enumerate(zip(pre, post)):
        if a.target_ids != b.target_ids:
            raise ValueError(f"prediction {i}: pre and post score different targets")


def locality(pre: Sequence[TargetScore], post: Sequence[TargetScore]) -> float | None:
    """F-Learning's locality: the share of facts whose argmax tokens over the target positions are all
    unchanged by the edit, ×100."""
    _check_paired(pre, post)
    if not pre:
        return None
    return 100.0 * sum(a.argmax_ids == b.argmax_ids for a, b in zip(pre, post)) / len(pre)


def token_agreement(pre: Sequence[TargetScore], post: Sequence[TargetScore]) -> float | None:
    """EasyEdit's locality: per prompt the share of target positions whose argmax token is the same
    before and after the edit, averaged over prompts, ×100."""
    _check_paired(pre, post)
    if not pre:
        return None
    per_prompt = [sum(x == y for x, y in zip(a.argmax_ids, b.argmax_ids)) / len(a.argmax_ids) for a, b in zip(pre, post)]
    return 100.0 * sum(per_prompt) / len(per_prompt)


@dataclass(frozen=True)
class RetentionMetrics:
    """Zhu et al.'s accuracies (×100): modified facts, unmodified facts, and their mean Ā."""

    A_M: float | None
    A_F_minus_S: float | None
    A_bar: float | None
    num_modified: int
    num_unmodified: int

    def as_dict(self) -> dict:
        return asdict(self)


def retention_metrics(model, modified: Sequence[Fact], unmodified: Sequence[Fact], tokenizer=None, *,
                      max_tokens: int | None = None) -> RetentionMetrics:
    """``A_M`` on ``modified`` (facts with their new targets), ``A_{F\\S}`` on ``unmodified``, and
    ``Ā = (A_M + A_{F\\S}) / 2``."""
    scores = predict_facts(model, list(modified) + list(unmodified), tokenizer, max_tokens=max_tokens)
    a_m = accuracy(scores[:len(modified)])
    a_f = accuracy(scores[len(modified):])
    a_bar = None if a_m is None or a_f is None else (a_m + a_f) / 2
    return RetentionMetrics(a_m, a_f, a_bar, len(modified), len(unmodified))


@dataclass(frozen=True)
class FLearningMetrics:
    """Ni et al.'s reliability, generality and locality (×100), plus EasyEdit's token-level locality."""

    reliability: float | None
    generality: float | None
    locality: float | None
    locality_token_agreement: float | None

    def as_dict(self) -> dict:
        return asdict(self)


class FactProbe:
    """Measure the seeds' metrics around an edit: construct it on the unedited model (it records the
    predictions on the unrelated facts), edit, then call :meth:`measure`::

        probe = FactProbe(model, modified=new_facts, unmodified=kept_facts, paraphrases=rephrased_new_facts)
        ... fine-tune or apply deltas ...
        report = probe.measure(model)    # A_M, A_F_minus_S, A_bar, reliability, generality, locality, ...

    ``unmodified`` doubles as F-Learning's unrelated facts; pass ``unrelated`` to use a different set.
    """

    def __init__(self, model, *, modified: Sequence[Fact], unmodified: Sequence[Fact] = (),
                 paraphrases: Sequence[Fact] = (), unrelated: Sequence[Fact] | None = None, tokenizer=None,
                 max_tokens: int | None = None):
        self.modified, self.unmodified, self.paraphrases = list(modified), list(unmodified), list(paraphrases)
        self.unrelated = list(self.unmodified if unrelated is None else unrelated)
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.before = self._scores(model)

    def _scores(self, model) -> dict[str, list[TargetScore]]:
        groups = {"modified": self.modified, "unmodified": self.unmodified, "paraphrases": self.paraphrases,
                  "unrelated": self.unrelated}
        flat = [f for facts in groups.values() for f in facts]
        scores = predict_facts(model, flat, self.tokenizer, max_tokens=self.max_tokens)
        out, start = {}, 0
        for name, facts in groups.items():
            out[name] = scores[start:start + len(facts)]
            start += len(facts)
        return out

    def measure(self, model) -> dict:
        """The metrics on ``model`` now, with the pre-edit values beside them:
        ``{"pre": {...}, "post": {...}}`` where each holds ``A_M``, ``A_F_minus_S``, ``A_bar``,
        ``reliability``, ``generality``; ``post`` also ``locality`` and ``locality_token_agreement``."""
        after = self._scores(model)
        report = {}
        for phase, scores in (("pre", self.before), ("post", after)):
            a_m, a_f = accuracy(scores["modified"]), accuracy(scores["unmodified"])
            report[phase] = {"A_M": a_m, "A_F_minus_S": a_f,
                             "A_bar": None if a_m is None or a_f is None else (a_m + a_f) / 2,
                             "reliability": a_m, "generality": accuracy(scores["paraphrases"])}
        report["post"]["locality"] = locality(self.before["unrelated"], after["unrelated"])
        report["post"]["locality_token_agreement"] = token_agreement(self.before["unrelated"], after["unrelated"])
        report["counts"] = {name: len(getattr(self, name)) for name in ("modified", "unmodified", "paraphrases",
                                                                         "unrelated")}
        return report

    def flearning(self, model) -> FLearningMetrics:
        """F-Learning's three metrics (and EasyEdit's locality) on ``model`` now."""
        post = self.measure(model)["post"]
        return FLearningMetrics(post["reliability"], post["generality"], post["locality"],
                                post["locality_token_agreement"])
