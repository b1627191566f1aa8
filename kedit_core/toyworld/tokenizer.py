"""The toy world's word-level tokenizer, a real ``transformers.PreTrainedTokenizerFast``.

One token per word of the world's vocabulary (``\\w+`` runs and punctuation marks, case kept), so a
subject of two or three words is two or three tokens and every object is one token. Spaces are not
part of tokens: the pre-tokenizer splits on them and drops them, so a target written with kedit's
leading space (``" Oslo"``) is the same single token as ``Oslo`` inside ``"was born in Oslo"``. The
decoder joins words with spaces and removes the space before punctuation, so ``decode(encode(s)) == s``
for text in the world's spacing. No BOS is added (as GPT-2); ``<|endoftext|>`` separates documents.
"""
from __future__ import annotations

from typing import Iterable

__all__ = ["EOS", "PAD", "UNK", "SPECIAL_TOKENS", "build_tokenizer", "tokenizer_for_words"]

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = (EOS, PAD, UNK)  # ids 0, 1, 2


def tokenizer_for_words(words: Iterable[str], *, model_max_length: int = 128):
    """A ``PreTrainedTokenizerFast`` with one token per word in ``words`` (ids in sorted order after
    the special tokens, so the same words always give the same ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()   # \w+|[^\w\s]+ ; whitespace is dropped
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # join with spaces, no space before . , etc.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=model_max_length, padding_side="right",
                                   clean_up_tokenization_spaces=False)


def build_tokenizer(world, *, model_max_length: int = 128):
    """The tokenizer for ``world`` (a :class:`~kedit_core.toyworld.world.World`)."""
    return tokenizer_for_words(world.vocabulary(), model_max_length=model_max_length)
