import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kedit_core.text import encode, encode_target
from kedit_core.toyworld import build_tokenizer, build_world, filler_sentence, mention_sentence


@pytest.fixture(scope="module")
def world():
    return build_world()


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(world)


def test_is_a_real_fast_tokenizer_with_special_tokens(tok, world):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 1 and tok.unk_token_id == 2
    assert len(tok) == len(world.vocabulary()) + 3
    assert encode(tok, "Oslo") == [tok.convert_tokens_to_ids("Oslo")]   # no BOS added
    assert tok("Zzyx qwerty!")["input_ids"] == [tok.unk_token_id] * 3


def test_targets_with_kedit_leading_space_are_the_in_sentence_token(tok, world):
    for rel in world.relations:
        for obj in rel.objects:
            ids = encode_target(tok, " " + obj)
            assert len(ids) == 1 and ids != [tok.unk_token_id]
            sentence = encode(tok, f"{rel.templates[0].replace('{}', world.subjects[0])} {obj}")
            assert sentence[-1] == ids[0]


def test_round_trip_and_no_unknown_words(tok, world):
    rng = random.Random(0)
    texts = [world.sentence(f, t) for f in world.facts[:300] for t in range(5)]
    texts += [filler_sentence(rng) for _ in range(300)] + [mention_sentence(rng, s) for s in world.subjects[:300]]
    texts.append(" ".join(texts[:20]))
    for text in texts:
        ids = encode(tok, text)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_subject_tokens_and_last_token_index(tok, world):
    # The subject-last-token arithmetic editors use: prefix and prefix+subject tokenised separately.
    for fact in world.facts[:200]:
        n_words = len(fact.subject.split())
        assert len(encode(tok, fact.subject)) == n_words
        for template in world.relation(fact.relation_id).templates:
            prefix = template.split("{}")[0]
            filled = template.replace("{}", fact.subject)
            ids = encode(tok, filled)
            last = len(encode(tok, prefix + fact.subject)) - 1
            assert tok.convert_ids_to_tokens(ids[last]) == fact.subject.split()[-1]


def test_save_and_reload(tok, tmp_path, world):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = world.sentence(world.facts[5], 2)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.pad_token_id == tok.pad_token_id and again.eos_token_id == tok.eos_token_id
    assert again.decode(again(text)["input_ids"]) == text
