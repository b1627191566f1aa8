"""Where a fact is read: the position of the subject's last (or first) token in a tokenised prompt.

Two rules, which agree for BPE tokenizers on ordinary prompts:

* ``"reference"`` — the published code's rule (``rome/repr_tools.get_words_idxs_in_templates``): split
  the template at ``{}``, drop the space that ends the prefix and put it before the subject instead,
  tokenise prefix, subject and suffix separately and add up their lengths. kedit counts those pieces
  without special tokens and adds the BOS tokens the full encoding starts with (the published code
  counted BOS once per piece, which is off by one on Llama-style tokenizers; it was only run on
  GPT-2/GPT-J/NeoX, which have none). A prefix that does not end in a space (the published code
  asserts) is kept as is.
* ``"offsets"`` — kedit's default in fast mode: tokenise the filled prompt once with character
  offsets and take the tokens whose spans overlap the subject's characters. Exact for any fast
  tokenizer: with or without BOS, with spaces merged into the next token, word-level vocabularies.
  Tokenizers without offsets fall back to ``len(tok(prefix + subject)) - 1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import KeditError

__all__ = ["FACT_TOKENS", "POSITION_RULES", "EncodedPrompt", "encode_prompts", "leading_special_count"]

FACT_TOKENS = ("subject_last", "subject_first", "subject_first_after_last")
POSITION_RULES = ("reference", "offsets")


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt with the subject filled in, its token ids (special tokens included) and the index of
    the fact token among them."""

    text: str
    ids: list[int]
    index: int


def _check_template(template: str, subject: str) -> tuple[str, str]:
    if template.count("{}") != 1:
        raise KeditError(f"prompt template {template!r} must hold exactly one '{{}}' for the subject {subject!r}")
    prefix, suffix = template.split("{}")
    return prefix, suffix


def leading_special_count(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before a text's own tokens."""
    probe = "a b"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return start
    return 0


def _pick(first: int, last: int, has_suffix: bool, fact_token: str) -> int:
    if fact_token == "subject_last":
        return last
    if fact_token == "subject_first":
        return first
    if fact_token == "subject_first_after_last":
        return last + 1 if has_suffix else last  # no token after the subject: its last token
    raise KeditError(f"fact_token {fact_token!r} is not supported; expected one of {', '.join(FACT_TOKENS)}")


def _reference_rule(tokenizer, templates, subjects, fact_token) -> list[int]:
    lead = leading_special_count(tokenizer)
    prefixes, words, suffixes = [], [], []
    for template, subject in zip(templates, subjects):
        prefix, suffix = _check_template(template, subject)
        word = subject
        if prefix and prefix.endswith(" "):
            prefix, word = prefix[:-1], " " + subject.strip()
        prefixes.append(prefix)
        words.append(word)
        suffixes.append(suffix)
    n = len(templates)
    pieces = tokenizer(prefixes + words + suffixes, add_special_tokens=False)["input_ids"]
    lengths = [len(p) for p in pieces]
    out = []
    for i in range(n):
        n_prefix, n_word, n_suffix = lengths[i], lengths[n + i], lengths[2 * n + i]
        first = lead + n_prefix
        last = lead + n_prefix + n_word - 1
        out.append(_pick(first, last, n_suffix > 0, fact_token))
    return out


def _offsets_rule(tokenizer, templates, subjects, fact_token, texts) -> tuple[list[list[int]], list[int]] | None:
    try:
        enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None  # a slow tokenizer: no offsets
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    all_ids, out = [], []
    for template, subject, text, ids, offsets in zip(templates, subjects, texts, enc["input_ids"],
                                                    enc["offset_mapping"]):
        prefix, _ = _check_template(template, subject)
        start, end = len(prefix), len(prefix) + len(subject)
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start and ids[i] not in special]
        if not hits:
            raise KeditError(f"cannot find the subject {subject!r} among the tokens of {text!r}")
        last = max(hits)
        has_suffix = any(b > a and ids[i] not in special for i, (a, b) in enumerate(offsets) if i > last)
        all_ids.append(list(ids))
        out.append(_pick(min(hits), last, has_suffix, fact_token))
    return all_ids, out


def _prefix_rule(tokenizer, templates, subjects, fact_token) -> list[int]:
    out = []
    for template, subject in zip(templates, subjects):
        prefix, suffix = _check_template(template, subject)
        n_prefix = len(tokenizer(prefix, add_special_tokens=True)["input_ids"])
        n_with = len(tokenizer(prefix + subject, add_special_tokens=True)["input_ids"])
        n_all = len(tokenizer(prefix + subject + suffix, add_special_tokens=True)["input_ids"])
        first = n_prefix if prefix else leading_special_count(tokenizer)
        out.append(_pick(first, n_with - 1, n_all > n_with, fact_token))
    return out


def encode_prompts(tokenizer, templates: Sequence[str], subjects: Sequence[str], *,
                   fact_token: str = "subject_last", rule: str = "offsets") -> list[EncodedPrompt]:
    """Fill each template's ``{}`` with its subject, tokenise it (special tokens included) and find the
    fact token (see the module docstring for the two rules)."""
    if len(templates) != len(subjects):
        raise ValueError(f"{len(templates)} templates but {len(subjects)} subjects")
    if rule not in POSITION_RULES:
        raise KeditError(f"unknown subject position rule {rule!r}; expected one of {', '.join(POSITION_RULES)}")
    if fact_token not in FACT_TOKENS:
        raise KeditError(f"fact_token {fact_token!r} is not supported; expected one of {', '.join(FACT_TOKENS)} "
                         "(the published code marks 'last' as broken for MEMIT)")
    if not templates:
        return []
    texts = [t.replace("{}", s, 1) for t, s in zip(templates, subjects)]
    indices = None
    ids_list = None
    if rule == "offsets":
        found = _offsets_rule(tokenizer, templates, subjects, fact_token, texts)
        if found is not None:
            ids_list, indices = found
        else:
            indices = _prefix_rule(tokenizer, templates, subjects, fact_token)
    else:
        indices = _reference_rule(tokenizer, templates, subjects, fact_token)
    if ids_list is None:
        ids_list = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    out = []
    for text, ids, index in zip(texts, ids_list, indices):
        if not 0 <= index < len(ids):
            raise KeditError(f"the subject position {index} computed for {text!r} is outside its {len(ids)} tokens "
                             "(the tokenizer splits the text differently from its parts); use the 'offsets' rule")
        out.append(EncodedPrompt(text=text, ids=ids, index=index))
    return out
