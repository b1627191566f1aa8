"""Tiny random models of every supported family, and the test tokenizer, for tests and benchmarks.

Nothing here downloads anything: models are built from transformers configs with random weights,
and the tokenizer is a byte-level BPE trained on the test data (see :mod:`.build_tokenizer`)::

    from kedit_core.testing import tiny_model, save_tiny_model
    loaded = tiny_model("llama", num_layers=4)          # a LoadedModel
    path = save_tiny_model("gpt2", tmp_path / "gpt2")   # a save_pretrained directory
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

TOKENIZER_FILE = Path(__file__).parent / "data" / "bpe-4k.json"
SPECIAL = "<|endoftext|>"

# Families whose real tokenizers prepend a BOS token get a test tokenizer that does too.
_BOS_FAMILIES = {"llama", "mistral", "gemma", "gemma2", "gemma3", "olmo2", "phi3"}


def test_tokenizer(add_bos: bool = False):
    """A ``PreTrainedTokenizerFast`` (4,096 byte-level BPE tokens; ``<|endoftext|>`` is BOS, EOS and
    PAD). ``add_bos=True`` prepends BOS to every encoding, as Llama-family tokenizers do."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(TOKENIZER_FILE))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A {SPECIAL} $B", special_tokens=[(SPECIAL, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL,
                                   unk_token=None, add_bos_token=add_bos)


def _llama_like(n_layers: int, d: int, ctx: int, **extra) -> dict:
    return dict(num_hidden_layers=n_layers, hidden_size=d, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=4 * d, max_position_embeddings=ctx, **extra)


CONFIG_BUILDERS: dict[str, Callable[[int, int, int], tuple[str, dict]]] = {
    "gpt2": lambda n, d, ctx: ("gpt2", dict(n_layer=n, n_embd=d, n_head=4, n_positions=ctx, n_inner=4 * d)),
    "gpt-neo": lambda n, d, ctx: ("gpt_neo", dict(num_layers=n, hidden_size=d, num_heads=4, max_position_embeddings=ctx,
                                                  intermediate_size=4 * d, attention_types=[[["global"], n]])),
    "gptj": lambda n, d, ctx: ("gptj", dict(n_layer=n, n_embd=d, n_head=4, n_positions=ctx, rotary_dim=8,
                                            n_inner=4 * d)),
    "gpt-neox": lambda n, d, ctx: ("gpt_neox", dict(num_hidden_layers=n, hidden_size=d, num_attention_heads=4,
                                                    intermediate_size=4 * d, max_position_embeddings=ctx)),
    "llama": lambda n, d, ctx: ("llama", _llama_like(n, d, ctx)),
    "mistral": lambda n, d, ctx: ("mistral", _llama_like(n, d, ctx)),
    "qwen2": lambda n, d, ctx: ("qwen2", _llama_like(n, d, ctx)),
    "qwen3": lambda n, d, ctx: ("qwen3", _llama_like(n, d, ctx, head_dim=d // 4)),
    "gemma": lambda n, d, ctx: ("gemma", _llama_like(n, d, ctx, head_dim=d // 4)),
    "gemma2": lambda n, d, ctx: ("gemma2", _llama_like(n, d, ctx, head_dim=d // 4)),
    # Gemma 3 as released: tied head, every 6th layer global and the rest sliding-window attention
    # (a window shorter than the test prompts, so both kinds are exercised).
    "gemma3": lambda n, d, ctx: ("gemma3_text", _llama_like(
        n, d, ctx, head_dim=d // 4, query_pre_attn_scalar=d // 4, sliding_window=8, tie_word_embeddings=True,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])),
    "phi3": lambda n, d, ctx: ("phi3", _llama_like(n, d, ctx)),
    "olmo2": lambda n, d, ctx: ("olmo2", _llama_like(n, d, ctx)),
}
FAMILIES = tuple(CONFIG_BUILDERS)
# The families the foundation promises (the rest are extras that cost one adapter line each).
CORE_FAMILIES = ("gpt2", "gptj", "gpt-neox", "llama", "mistral", "qwen2")


def tiny_config(family: str, *, num_layers: int = 4, hidden_size: int = 64, context_length: int = 128,
                vocab_size: int | None = None):
    from transformers import AutoConfig

    if family not in CONFIG_BUILDERS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    model_type, kwargs = CONFIG_BUILDERS[family](num_layers, hidden_size, context_length)
    tok_size = vocab_size or test_tokenizer().vocab_size
    tied = kwargs.pop("tie_word_embeddings", False)
    return AutoConfig.for_model(model_type, vocab_size=tok_size, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                tie_word_embeddings=tied, **kwargs)


def tiny_model(family: str = "gpt2", *, num_layers: int = 4, hidden_size: int = 64, context_length: int = 128,
               seed: int = 0, dtype: torch.dtype = torch.float32):
    """A :class:`~kedit_core.models.LoadedModel` with random weights (seeded) and the test tokenizer."""
    from transformers import AutoModelForCausalLM

    from ..models import wrap_model

    config = tiny_config(family, num_layers=num_layers, hidden_size=hidden_size, context_length=context_length)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    return wrap_model(model, test_tokenizer(add_bos=family in _BOS_FAMILIES), source=f"tiny-{family}")


def save_tiny_model(family: str, path: str | Path, **kwargs) -> Path:
    """Write a tiny random model and its tokenizer as a ``save_pretrained`` directory."""
    loaded = tiny_model(family, **kwargs)
    path = Path(path)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path
