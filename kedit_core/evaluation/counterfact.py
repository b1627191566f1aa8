"""CounterFact metrics (ROME/MEMIT), per record and aggregated; everything reported ×100.

For each prompt, ``nll(target)`` is the mean per-token negative log-likelihood of ``" " + target``
after the prompt, teacher forced (:func:`kedit_core.text.score_targets`).

- ES (efficacy success): mean over the rewrite prompt(s) of ``nll(new) < nll(true)``;
  PS (paraphrase success): the same over the paraphrase prompts;
  NS (neighbourhood success): mean of ``nll(true) < nll(new)`` over the neighbourhood prompts.
- EM / PM / NM (magnitudes): the mean of ``exp(−nll(new)) − exp(−nll(true))`` (sign flipped for NM).
- rewrite / paraphrase / neighborhood accuracy: the share of prompts whose target (new; true for the
  neighbourhood) is the argmax at every one of its tokens.
- Score: harmonic mean of the aggregated ES, PS and NS.
- GE: per generated text ``(2/3·H2 + 4/3·H3) / 2`` in bits (word n-grams), averaged over the record's
  generation prompts; RS: TF-IDF cosine between the record's generations (joined) and reference texts
  about the new object (joined). See :mod:`.text_metrics` and :mod:`.generation`.

Per record the success values are means over that record's prompts; the aggregate averages records, as
the reference's ``summarize.py`` does. Targets are tokenised on their own and appended to the prompt's
tokens (the reference tokenises ``prompt + " " + target`` as one string; with byte-level BPE the tokens
are the same, and a BOS-adding tokenizer no longer puts a BOS inside the target).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..text import score_targets
from .aggregate import aggregate_records, harmonic_mean, mean
from .datasets import CounterFactCase
from .generation import GenerationSettings, prompt_seed, sample_texts
from .text_metrics import TfidfModel, generation_entropy

__all__ = ["SECTIONS", "PROBABILITY_METRICS", "GENERATION_METRICS", "score_counterfact", "counterfact_generation",
           "aggregate_counterfact", "ReferenceTexts"]

# (section name, which target should win, success key, magnitude key, accuracy key)
SECTIONS = (
    ("rewrite", "new", "ES", "EM", "rewrite_acc"),
    ("paraphrase", "new", "PS", "PM", "paraphrase_acc"),
    ("neighborhood", "true", "NS", "NM", "neighborhood_acc"),
)
PROBABILITY_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM", "rewrite_acc", "paraphrase_acc", "neighborhood_acc")
GENERATION_METRICS = ("GE", "RS")


def _section_prompts(case: CounterFactCase, section: str) -> Sequence[str]:
    return {"rewrite": case.rewrite_prompts, "paraphrase": case.paraphrase_prompts,
            "neighborhood": case.neighborhood_prompts}[section]


def score_counterfact(model, tokenizer, cases: Sequence[CounterFactCase], *, max_tokens: int | None = None,
                      max_batch: int | None = None, progress: bool = False) -> list[dict]:
    """Score every prompt of every case against both targets in one batched pass and return, per case,
    ``{"case_id", "nll": {section: [{"target_new", "target_true"}]}, "correct": {section: [bool]},
    "metrics": {ES, PS, NS, EM, PM, NM, *_acc}}`` (metrics ×100; a section with no prompts gives None)."""
    prompts, targets, slots = [], [], []
    for c, case in enumerate(cases):
        for section, *_ in SECTIONS:
            for j, prompt in enumerate(_section_prompts(case, section)):
                for which, target in (("new", case.request.target_new), ("true", case.request.target_true)):
                    prompts.append(prompt)
                    targets.append(target)
                    slots.append((c, section, j, which))
    scores = score_targets(model, tokenizer, prompts, targets, max_tokens=max_tokens, max_batch=max_batch,
                           progress=progress, desc="scoring CounterFact")
    table: dict = {}
    for (c, section, j, which), score in zip(slots, scores):
        table[(c, section, j, which)] = score
    out = []
    for c, case in enumerate(cases):
        record = {"case_id": case.case_id, "nll": {}, "correct": {}, "metrics": {}}
        for section, winner, success_key, magnitude_key, acc_key in SECTIONS:
            n = len(_section_prompts(case, section))
            pairs = [(table[(c, section, j, "new")], table[(c, section, j, "true")]) for j in range(n)]
            record["nll"][section] = [{"target_new": new.nll, "target_true": true.nll} for new, true in pairs]
            if winner == "new":
                success = [new.nll < true.nll for new, true in pairs]
                magnitude = [math.exp(-new.nll) - math.exp(-true.nll) for new, true in pairs]
                correct = [new.correct for new, _ in pairs]
            else:
                success = [true.nll < new.nll for new, true in pairs]
                magnitude = [math.exp(-true.nll) - math.exp(-new.nll) for new, true in pairs]
                correct = [true.correct for _, true in pairs]
            record["correct"][section] = correct
            for key, values in ((success_key, success), (magnitude_key, magnitude), (acc_key, correct)):
                m = mean(float(v) for v in values)
                record["metrics"][key] = None if m is None else 100.0 * m
        out.append(record)
    return out


class ReferenceTexts:
    """Reference texts about objects, for RS: ``(relation_id, target_id) -> [texts]``.

    Reads the reference's ``attribute_snippets.json`` layout (a list of ``{relation_id, target_id,
    samples: [{name, text}]}``) or a plain ``{relation_id: {target_id: [texts]}}`` object.
    """

    def __init__(self, texts: Mapping[tuple[str, str], Sequence[str]]):
        self.texts = {k: list(v) for k, v in texts.items()}

    def get(self, relation_id: str | None, target_id: str | None) -> list[str]:
        return self.texts.get((relation_id, target_id), [])

    def all_texts(self) -> list[str]:
        return [t for texts in self.texts.values() for t in texts]

    @classmethod
    def from_json(cls, data, *, source: str = "reference texts") -> "ReferenceTexts":
        from ..errors import RecordError

        texts: dict[tuple[str, str], list[str]] = {}
        if isinstance(data, list):
            for i, item in enumerate(data):
                if not isinstance(item, dict) or not {"relation_id", "target_id", "samples"} <= set(item) \
                        or not isinstance(item["samples"], list) \
                        or not all(isinstance(item[k], (str, int)) for k in ("relation_id", "target_id")):
                    raise RecordError("expected {relation_id, target_id, samples: [{text}]}", source=source, index=i)
                for k, sample in enumerate(item["samples"]):
                    text = sample.get("text") if isinstance(sample, dict) else sample
                    if not isinstance(text, str):
                        raise RecordError(f"expected a text string; got {text!r}", source=source, index=i,
                                          field=f"samples[{k}].text")
                    texts.setdefault((item["relation_id"], item["target_id"]), []).append(text)
        elif isinstance(data, dict):
            for rel, by_target in data.items():
                if not isinstance(by_target, dict):
                    raise RecordError("expected {target_id: [texts]}", source=source, field=str(rel))
                for tid, items in by_target.items():
                    if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                        raise RecordError("expected a list of texts", source=source, field=f"{rel}.{tid}")
                    texts.setdefault((rel, tid), []).extend(items)
        else:
            raise RecordError(f"expected a list or an object; got {type(data).__name__}", source=source)
        return cls(texts)

    @classmethod
    def load(cls, path) -> "ReferenceTexts":
        from ..requests import read_json_file

        return cls.from_json(read_json_file(path, what="reference texts file"), source=str(path))


def counterfact_generation(model, tokenizer, cases: Sequence[CounterFactCase],
                           settings: GenerationSettings = GenerationSettings(), *,
                           references: ReferenceTexts | None = None, tfidf: TfidfModel | None = None,
                           progress: bool = False) -> list[dict]:
    """Generate from every case's generation prompts (seeded per case and prompt) and return per case
    ``{"case_id", "texts": [...], "metrics": {"GE", "RS"}}`` (×100). RS is None without reference texts
    for the case's new object, or without a TF-IDF model."""
    prompts, seeds, owner = [], [], []
    for c, case in enumerate(cases):
        for j, prompt in enumerate(case.generation_prompts):
            prompts.append(prompt)
            seeds.append(prompt_seed(settings.seed, case.case_id, j))
            owner.append(c)
    texts = sample_texts(model, tokenizer, prompts, seeds, settings, progress=progress)
    per_case: list[list[str]] = [[] for _ in cases]
    for c, text in zip(owner, texts):
        per_case[c].append(text)
    out = []
    for case, gen in zip(cases, per_case):
        metrics = {"GE": 100.0 * generation_entropy(gen) if gen else None, "RS": None}
        if gen and references is not None and tfidf is not None:
            refs = references.get(case.request.relation_id, case.target_new_id)
            if refs:
                metrics["RS"] = 100.0 * tfidf.similarity(" ".join(gen), " ".join(refs))
        out.append({"case_id": case.case_id, "texts": gen, "metrics": metrics})
    return out


def aggregate_counterfact(records: Sequence[Mapping[str, float | None]]) -> dict:
    """Average per-record metrics (``record["metrics"]``-style dicts) and add Score = hmean(ES, PS, NS)."""
    keys = list(PROBABILITY_METRICS) + [k for k in GENERATION_METRICS if any(k in r for r in records)]
    out = aggregate_records(records, keys)
    out["Score"] = harmonic_mean([out["ES"], out["PS"], out["NS"]])
    out["num_records"] = len(records)
    return out
