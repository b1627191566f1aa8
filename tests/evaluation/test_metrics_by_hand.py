"""CounterFact and zsRE metrics equal a straightforward hand computation: one plain forward per prompt,
then the averages written out."""
import json
import math

import pytest
import torch

from kedit_core.evaluation import (aggregate_counterfact, aggregate_zsre, cases_from_records, score_counterfact,
                                   score_zsre)

CASES = [0, 7, 23, 101]  # a handful of records


def nll_and_hits(m, prompt: str, target: str):
    """Mean per-token NLL of ``target`` after ``prompt``, and per-token argmax hits, from one forward."""
    tok = m.tokenizer
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = m.model(torch.tensor([p_ids + t_ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    nll = -sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(t_ids)) / len(t_ids)
    hits = [int(logits[len(p_ids) - 1 + j].argmax()) == t for j, t in enumerate(t_ids)]
    return nll, hits


def by_hand_counterfact(m, record):
    rr = record["requested_rewrite"]
    new, true = " " + rr["target_new"]["str"], " " + rr["target_true"]["str"]
    sections = {"rewrite": [rr["prompt"].format(rr["subject"])], "paraphrase": record["paraphrase_prompts"],
                "neighborhood": record["neighborhood_prompts"]}
    out = {}
    for name, prompts in sections.items():
        rows = []
        for p in prompts:
            (n_new, h_new), (n_true, h_true) = nll_and_hits(m, p, new), nll_and_hits(m, p, true)
            rows.append((n_new, n_true, all(h_new), all(h_true)))
        k = len(rows)
        if name == "neighborhood":
            out["NS"] = 100 * sum(t < n for n, t, _, _ in rows) / k
            out["NM"] = 100 * sum(math.exp(-t) - math.exp(-n) for n, t, _, _ in rows) / k
            out["neighborhood_acc"] = 100 * sum(ct for _, _, _, ct in rows) / k
        else:
            s, mag, acc = {"rewrite": ("ES", "EM", "rewrite_acc"), "paraphrase": ("PS", "PM", "paraphrase_acc")}[name]
            out[s] = 100 * sum(n < t for n, t, _, _ in rows) / k
            out[mag] = 100 * sum(math.exp(-n) - math.exp(-t) for n, t, _, _ in rows) / k
            out[acc] = 100 * sum(cn for _, _, cn, _ in rows) / k
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_counterfact_metrics_match_hand_computation(family, request, counterfact_path):
    m = request.getfixturevalue(family)
    records = [json.loads(counterfact_path.read_text())[i] for i in CASES]
    fmt, cases = cases_from_records(records, "auto")
    assert fmt == "counterfact"
    ours = score_counterfact(m.model, m.tokenizer, cases, max_tokens=256)
    hand = [by_hand_counterfact(m, r) for r in records]
    for o, h, r in zip(ours, hand, records):
        assert o["case_id"] == r["case_id"]
        for key, value in h.items():
            assert o["metrics"][key] == pytest.approx(value, abs=1e-3), (r["case_id"], key)
    agg = aggregate_counterfact([o["metrics"] for o in ours])
    for key in hand[0]:
        assert agg[key] == pytest.approx(sum(h[key] for h in hand) / len(hand), abs=1e-3), key
    es, ps, ns = (sum(h[k] for h in hand) / len(hand) for k in ("ES", "PS", "NS"))
    expected_score = 0.0 if min(es, ps, ns) == 0 else 3 / (1 / es + 1 / ps + 1 / ns)
    assert agg["Score"] == pytest.approx(expected_score, abs=1e-3)
    assert agg["num_records"] == len(CASES) and agg["ES_n"] == len(CASES)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_zsre_metrics_match_hand_computation(family, request, zsre_path):
    m = request.getfixturevalue(family)
    records = [json.loads(zsre_path.read_text())[i] for i in CASES]
    fmt, cases = cases_from_records(records, "auto")
    assert fmt == "zsre"
    ours = score_zsre(m.model, m.tokenizer, cases)
    hand = []
    for r in records:
        answer = " " + r["answers"][0]
        hits = {"efficacy": nll_and_hits(m, r["src"], answer)[1],
                "paraphrase": nll_and_hits(m, r["rephrase"], answer)[1],
                "specificity": nll_and_hits(m, r["loc"] + "?", " " + r["loc_ans"])[1]}
        hand.append({k: 100 * sum(v) / len(v) for k, v in hits.items()})
    for o, h in zip(ours, hand):
        assert o["metrics"] == pytest.approx(h)
    agg = aggregate_zsre([o["metrics"] for o in ours])
    for key in ("efficacy", "paraphrase", "specificity"):
        assert agg[key] == pytest.approx(sum(h[key] for h in hand) / len(hand))


def test_a_model_that_knows_the_answers_scores_100(gpt2, zsre_path):
    """Specificity reads the loc question's own answer: a model that predicts it scores 100 there."""
    records = json.loads(zsre_path.read_text())[:3]
    _, cases = cases_from_records(records, "zsre")
    tok = gpt2.tokenizer
    # A model wrapper whose logits put all mass on the true next token of the sequence it is given.
    # Build it as an nn.Module so score_targets can run it.
    answers = {}
    for c in cases:
        for prompt, target in ((c.question, c.request.target_new), (c.rephrase, c.request.target_new),
                               (c.loc_prompt, c.loc_target)):
            ids = tok(prompt)["input_ids"] + tok(target, add_special_tokens=False)["input_ids"]
            answers[tuple(ids)] = ids

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, **kwargs):
            B, T = input_ids.shape
            logits = torch.zeros(B, T, tok.vocab_size)
            for b in range(B):
                n = int(attention_mask[b].sum())
                seq = input_ids[b, :n].tolist()
                # the scorer stops before the target's last token: continue the known sequence it starts
                full = next(ids for ids in answers.values() if ids[:n] == seq)
                for p in range(min(n, len(full) - 1)):
                    logits[b, p, full[p + 1]] = 10.0
            return type("Out", (), {"logits": logits})()

    ours = score_zsre(Oracle(), tok, cases)
    assert all(o["metrics"] == {"efficacy": 100.0, "paraphrase": 100.0, "specificity": 100.0} for o in ours)


def test_bad_records_are_named(tmp_path):
    from kedit_core.errors import RecordError
    from kedit_core.evaluation import load_cases

    bad = tmp_path / "cf.json"
    good = {"case_id": 5, "requested_rewrite": {"prompt": "{} is in", "subject": "X", "target_new": {"str": "A"},
                                                "target_true": {"str": "B"}},
            "paraphrase_prompts": ["p"], "neighborhood_prompts": ["n"]}
    bad.write_text(json.dumps([good, {**good, "neighborhood_prompts": "not a list"}]))
    with pytest.raises(RecordError, match=r"record 1, field 'neighborhood_prompts'"):
        load_cases(bad)
    bad.write_text(json.dumps([good, {**good, "requested_rewrite": {**good["requested_rewrite"], "target_true": None}}]))
    with pytest.raises(RecordError, match=r"record 1, field 'requested_rewrite.target_true'"):
        load_cases(bad)
    bad.write_text(json.dumps([good, {**good, "requested_rewrite": {**good["requested_rewrite"], "prompt": "no slot"}}]))
    with pytest.raises(RecordError, match=r"record 1, field 'requested_rewrite.prompt'"):
        load_cases(bad)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"prompt": "{} is", "subject": "X", "target_new": "A"}]))
    with pytest.raises(RecordError, match="CounterFact or zsRE"):
        load_cases(plain)
