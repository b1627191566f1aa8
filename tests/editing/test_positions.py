"""Subject positions: the published rule and kedit's offsets rule, on BPE tokenizers with and without
BOS, a SentencePiece-style tokenizer that merges the leading space into the word, and a word-level one."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import PreTrainedTokenizerFast

from kedit_core.editing.positions import encode_prompts, leading_special_count
from kedit_core.errors import KeditError
from kedit_core.testing import test_tokenizer as make_test_tokenizer

CASES = [("{} plays the sport of", "LeBron James"), ("The capital of {} is", "France"),
         ("The sky. {} was born in", "Albert Einstein"), ("What is {}?", "Mount Everest"),
         ("{}", "Danielle Darrieux"), ("The mother tongue of {}", "Danielle Darrieux")]


def word_level(metaspace: bool, bos: bool):
    words = ["The", "capital", "of", "France", "is", "sky.", "LeBron", "James", "plays", "sport", "Paris", "a",
             "Mount", "Everest", "What", "?", "[BOS]", "[PAD]", "[UNK]"]
    if metaspace:
        vocab = {("▁" + w if not w.startswith("[") else w): i for i, w in enumerate(words)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        vocab = {w: i for i, w in enumerate(words)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")


def subject_tokens(tok, enc, subject):
    return tok.decode(enc.ids[enc.index]).strip()


@pytest.mark.parametrize("bos", [False, True])
def test_bpe_rules_agree_and_point_at_the_subjects_last_token(bos):
    tok = make_test_tokenizer(add_bos=bos)
    templates, subjects = zip(*CASES)
    ref = encode_prompts(tok, templates, subjects, rule="reference")
    off = encode_prompts(tok, templates, subjects, rule="offsets")
    assert leading_special_count(tok) == (1 if bos else 0)
    for r, o, subject in zip(ref, off, subjects):
        assert r.ids == o.ids and r.index == o.index, (r, o)
        last_piece = tok.decode(o.ids[o.index])
        assert subject.endswith(last_piece.strip()), (subject, last_piece)
        prefix_text = tok.decode(o.ids[: o.index + 1], skip_special_tokens=True)
        assert prefix_text.rstrip().endswith(subject)


@pytest.mark.parametrize("metaspace", [False, True])
@pytest.mark.parametrize("bos", [False, True])
def test_word_level_tokenizers(metaspace, bos):
    tok = word_level(metaspace, bos)
    enc = encode_prompts(tok, ["The capital of {} is", "{} plays", "What is {} ?"], ["France", "LeBron James",
                                                                                     "Mount Everest"])
    expected = [(3, "France"), (1, "James"), (3, "Everest")]
    for e, (index, word) in zip(enc, expected):
        assert e.index == index + (1 if bos else 0), e
        assert tok.convert_ids_to_tokens(e.ids[e.index]).lstrip("▁") == word


def test_fact_token_variants():
    tok = make_test_tokenizer()
    last, first, after = (encode_prompts(tok, ["The capital of {} is"], ["Albert Einstein"], fact_token=f)[0]
                          for f in ("subject_last", "subject_first", "subject_first_after_last"))
    assert first.index < last.index and after.index == last.index + 1
    assert tok.decode(first.ids[first.index]).strip() == tok.decode(tok("Albert", add_special_tokens=False)[
        "input_ids"][0]).strip() or first.index == 3
    # No token after the subject: "first after last" falls back to the last, as published.
    end = encode_prompts(tok, ["I met {}"], ["Albert Einstein"], fact_token="subject_first_after_last")[0]
    assert end.index == len(end.ids) - 1


def test_reference_rule_without_a_space_before_the_subject():
    tok = make_test_tokenizer()
    enc = encode_prompts(tok, ["({}) is"], ["France"], rule="reference")[0]
    assert tok.decode(enc.ids[: enc.index + 1]).endswith("France")


def test_bad_templates_and_settings_are_errors():
    tok = make_test_tokenizer()
    with pytest.raises(KeditError, match="exactly one"):
        encode_prompts(tok, ["{} and {}"], ["x"])
    with pytest.raises(KeditError, match="fact_token 'last'"):
        encode_prompts(tok, ["{} is"], ["x"], fact_token="last")
    with pytest.raises(KeditError, match="unknown subject position rule"):
        encode_prompts(tok, ["{} is"], ["x"], rule="guess")
