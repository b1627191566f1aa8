"""The seed papers' metrics: A_M, A_{F\\S}, Ā (Zhu et al.), reliability/generality/locality (F-Learning),
token-level locality (EasyEdit)."""
import pytest
import torch

from kedit_core import Deltas
from kedit_core.evaluation import (Fact, FactProbe, accuracy, locality, predict_facts, retention_metrics,
                                   token_agreement)
from kedit_core.text import TargetScore, encode

PROMPTS = ["Danielle Darrieux was born in", "The Eiffel Tower is in", "Toko Yasuda plays the",
           "The capital of France is", "Apple was founded by", "Berlin is a city in"]


def greedy_target(m, prompt, n_tokens=2):
    """The model's own greedy continuation: a fact the model 'knows'."""
    ids = encode(m.tokenizer, prompt)
    out = []
    for _ in range(n_tokens):
        with torch.no_grad():
            nxt = int(m.model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return m.tokenizer.decode(out)


def known_and_unknown(m):
    known = [Fact(p, greedy_target(m, p)) for p in PROMPTS[:3]]
    unknown = [Fact(p, " zebra crossing") for p in PROMPTS[3:]]
    return known, unknown


def test_accuracy_counts_facts_whose_whole_target_is_argmax(gpt2):
    known, unknown = known_and_unknown(gpt2)
    scores = predict_facts(gpt2, known + unknown)
    # decode/encode may split a greedy continuation into other tokens, so count rather than assume
    n_known = sum(s.correct for s in scores[:3])
    assert n_known >= 1
    assert accuracy(scores) == pytest.approx(100 * n_known / 6)
    assert accuracy(predict_facts(gpt2.model, unknown, gpt2.tokenizer)) == 0.0
    r = retention_metrics(gpt2, modified=unknown, unmodified=known)
    assert r.A_M == 0.0 and r.A_F_minus_S == pytest.approx(100 * n_known / 3)
    assert r.A_bar == pytest.approx((r.A_M + r.A_F_minus_S) / 2) and (r.num_modified, r.num_unmodified) == (3, 3)
    assert accuracy([]) is None


def score(argmax, target=(1, 2, 3)):
    return TargetScore(tuple(target), tuple(0.0 for _ in target), tuple(argmax))


def test_locality_definitions_by_hand():
    pre = [score((1, 2, 3)), score((4, 5, 6)), score((7, 8, 9)), score((1, 1, 1))]
    post = [score((1, 2, 3)), score((4, 0, 6)), score((0, 0, 0)), score((1, 1, 1))]
    assert locality(pre, post) == pytest.approx(100 * 2 / 4)  # F-Learning: unchanged predictions
    assert token_agreement(pre, post) == pytest.approx(100 * (1 + 2 / 3 + 0 + 1) / 4)  # EasyEdit: per-token
    with pytest.raises(ValueError, match="different targets"):
        locality(pre, [score((1, 2, 3), target=(9, 9, 9))] * 4)


def test_fact_probe_around_an_edit(gpt2):
    known, unknown = known_and_unknown(gpt2)
    modified = [Fact(PROMPTS[3], " football"), Fact(PROMPTS[4], " football")]  # a one-token target
    paraphrases = [Fact("Name the capital of France:", " football")]
    probe = FactProbe(gpt2, modified=modified, unmodified=known, paraphrases=paraphrases)
    # An edit that makes " football" the argmax after the modified prompts (boost its unembedding row along
    # those prompts' final hidden states) and leaves everything else in the weights alone.
    (target_id,) = encode(gpt2.tokenizer, " football")
    from kedit_core.tracing import Trace

    delta = torch.zeros_like(gpt2.adapter.unembedding.weight)
    for fact in modified:
        with torch.no_grad(), Trace(gpt2.model, gpt2.adapter.final_norm_name) as tr:
            gpt2.model(torch.tensor([encode(gpt2.tokenizer, fact.prompt)]))
        h = tr.output_tensor[0, -1]
        delta[target_id] += 50 * h / h.dot(h)
    with Deltas({gpt2.adapter.unembedding_name + ".weight": delta}).apply(gpt2.model):
        report = probe.measure(gpt2)
        flearn = probe.flearning(gpt2)
        after = predict_facts(gpt2, known)
    assert report["pre"]["A_M"] == 0.0 and report["post"]["A_M"] == 100.0
    assert report["post"]["reliability"] == report["post"]["A_M"] == flearn.reliability
    assert report["post"]["A_bar"] == pytest.approx((report["post"]["A_M"] + report["post"]["A_F_minus_S"]) / 2)
    assert report["counts"] == {"modified": 2, "unmodified": 3, "paraphrases": 1, "unrelated": 3}
    # the locality numbers equal the definitions applied to the scores themselves
    assert report["post"]["locality"] == locality(probe.before["unrelated"], after)
    assert flearn.locality_token_agreement == token_agreement(probe.before["unrelated"], after)
    assert 0 <= flearn.locality <= 100 and flearn.generality in (0.0, 100.0)
    # with the edit reverted, nothing changed: locality is 100
    assert probe.measure(gpt2)["post"]["locality"] == 100.0


def test_fact_from_request():
    from kedit_core import EditRequest

    req = EditRequest(prompt="{} plays", subject="LeBron", target_new="football", target_true="basketball")
    assert Fact.from_request(req) == Fact("LeBron plays", " football")
    assert Fact.from_request(req, target="true") == Fact("LeBron plays", " basketball")
