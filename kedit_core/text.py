"""Tokenising prompts with targets, and scoring targets under teacher forcing: the one copy used by
evaluation, fine-tuning losses and fact-recall checks.

A target is scored token by token after its prompt: ``ids = tok(prompt) + tok(target)`` (the target
tokenised on its own, without special tokens, leading space included), and the logits at position
``p`` predict token ``p + 1``. :class:`PromptTargetBatch` stores that alignment as ``labels`` (the token
each position's logits must predict, ``-100`` elsewhere), right-padded.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

IGNORE = -100
# Default padded-token budget of one scoring batch (``len(batch) * longest row``), by device type:
# on CPUs, batches past a few hundred tokens fall out of cache and get slower per token (measured with
# bench/bench_eval.py); GPUs want large batches.
DEFAULT_SCORE_TOKENS = {"cpu": 512, "cuda": 8192}


def default_score_tokens(device) -> int:
    """The padded-token budget :func:`score_targets` uses on ``device`` when none is given."""
    return DEFAULT_SCORE_TOKENS.get(torch.device(device).type, 4096)


def encode(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_target(tokenizer, target: str) -> list[int]:
    """A target's tokens (no BOS/EOS). Raises if it tokenises to nothing."""
    ids = encode(tokenizer, target, add_special_tokens=False)
    if not ids:
        raise ValueError(f"target {target!r} tokenises to no tokens")
    return ids


@dataclass
class PromptTargetBatch:
    input_ids: torch.Tensor       # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor          # [B, T]: labels[b, p] = the token logits[b, p] must predict, or -100
    prompt_lengths: list[int]
    target_lengths: list[int]

    def to(self, device) -> "PromptTargetBatch":
        return PromptTargetBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                                 self.prompt_lengths, self.target_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def prompt_target_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                        include_last_target_token: bool = True, pad_id: int | None = None) -> PromptTargetBatch:
    """Encode ``prompt + target`` pairs for teacher-forced scoring of the targets.

    With ``include_last_target_token=False`` the input stops before the target's last token (what
    value optimisation feeds: the last token is predicted, never read).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    return collate_prompt_targets([encode(tokenizer, p) for p in prompts],
                                  [encode_target(tokenizer, t) for t in targets], pad_id=pad_id,
                                  include_last_target_token=include_last_target_token)


def collate_prompt_targets(prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]], *, pad_id: int,
                           include_last_target_token: bool = True) -> PromptTargetBatch:
    """:func:`prompt_target_batch` for pairs that are already tokenised (``prompt_ids[i]``, ``target_ids[i]``)."""
    if len(prompt_ids) != len(target_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
    rows, labels, p_lens, t_lens = [], [], [], []
    for p_ids, t_ids in zip(prompt_ids, target_ids):
        p_ids, t_ids = list(p_ids), list(t_ids)
        if not p_ids:
            raise ValueError("a prompt tokenises to no tokens: the first target token would have nothing to "
                             "follow (score an empty prompt with a tokenizer that adds BOS)")
        if not t_ids:
            raise ValueError("a target has no tokens")
        ids = p_ids + (t_ids if include_last_target_token else t_ids[:-1])
        lab = [IGNORE] * len(ids)
        for j, tok in enumerate(t_ids):
            lab[len(p_ids) - 1 + j] = tok
        rows.append(ids)
        labels.append(lab)
        p_lens.append(len(p_ids))
        t_lens.append(len(t_ids))
    width = max(max(len(r) for r in rows), max(len(lab) for lab in labels))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        label_t[b, : len(lab)] = torch.tensor(lab)
    return PromptTargetBatch(input_ids, attention, label_t, p_lens, t_lens)


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the labelled tokens, ``[B, T]`` with 0 where ``labels == -100``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.clamp_min(0)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked * (labels != IGNORE)


def mean_target_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean negative log-likelihood of the target tokens, ``[B]``."""
    lp = target_logprobs(logits, labels)
    counts = (labels != IGNORE).sum(-1).clamp_min(1)
    return -lp.sum(-1) / counts


def batches_by_tokens(lengths: Sequence[int], max_tokens: int, *, max_batch: int | None = None) -> Iterator[list[int]]:
    """Group indices into batches whose padded size (``len(batch) * longest``) stays within
    ``max_tokens``, visiting items sorted by length so padding is small. Yields lists of indices."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batch: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if batch and ((len(batch) + 1) * new_longest > max_tokens or (max_batch and len(batch) >= max_batch)):
            yield batch
            batch, new_longest = [], lengths[i]
        batch.append(i)
        longest = new_longest
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# Scoring many prompt+target pairs in padded batches (evaluation, fact-recall checks)

@dataclass(frozen=True)
class TargetScore:
    """How a model scores one target after its prompt under teacher forcing.

    ``logprobs[j]`` is the log-probability of target token ``j`` given the prompt and target tokens
    ``< j``; ``argmax_ids[j]`` is the model's top-1 token at that position.
    """

    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    argmax_ids: tuple[int, ...]

    @property
    def nll(self) -> float:
        """Mean per-token negative log-likelihood of the target (length-normalised)."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def token_hits(self) -> list[bool]:
        """Per target token: is it the model's argmax at its position?"""
        return [a == t for a, t in zip(self.argmax_ids, self.target_ids)]

    @property
    def correct(self) -> bool:
        """Every target token is the argmax (the whole target is predicted)."""
        return all(self.token_hits)

    @property
    def token_accuracy(self) -> float:
        hits = self.token_hits
        return sum(hits) / len(hits)


def model_context_length(model) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings``, ``n_positions`` or
    ``n_ctx``), or None when the config names none."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_prompt(prompt_ids: Sequence[int], room: int, *, keep_first: bool = False) -> list[int]:
    """Cut a prompt from the left to at most ``room`` tokens (the end is what the next token reads);
    ``keep_first`` keeps a leading BOS token in place."""
    prompt_ids = list(prompt_ids)
    if len(prompt_ids) <= room:
        return prompt_ids
    if keep_first and room >= 2:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1:]
    return prompt_ids[len(prompt_ids) - room:]


def _shared_prefix_carriers(p_ids: Sequence[Sequence[int]], t_ids: Sequence[Sequence[int]]
                            ) -> tuple[list[int], dict[int, list[int]]]:
    """Which pairs' sequences must run so that every pair can be scored from one of them.

    A causal model's logits at a position depend only on the tokens before it, so the run of
    ``prompt + s`` also scores, after the same prompt, any target ``t`` no longer than ``s`` whose tokens
    before its last are a prefix of ``s`` (every single-token target, for one). CounterFact scores each
    prompt with the new and the true object: most of its pairs need no pass of their own. Returns the
    carrier pairs in input order and, for each, the pairs it scores (itself included)."""
    members: dict[int, list[int]] = {}
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in sorted(range(len(p_ids)), key=lambda i: (-len(t_ids[i]), i)):
        target = list(t_ids[i])
        for c in by_prompt.get(tuple(p_ids[i]), ()):
            if list(t_ids[c][:len(target) - 1]) == target[:-1]:
                members[c].append(i)
                break
        else:
            by_prompt.setdefault(tuple(p_ids[i]), []).append(i)
            members[i] = [i]
    return sorted(members), members


def supports_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (compute the vocabulary projection only where
    asked)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for a forward of ``model``: transformers 5 renamed ``past_key_values`` to ``cache``
    (the old name warns, and goes in a later release); 4.x knows only the old name."""
    return {_cache_argument(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_argument(cls) -> str:
    try:
        return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def labelled_logits(model, batch: PromptTargetBatch, *, select: bool | None = None) -> torch.Tensor:
    """Logits at the labelled positions only, ``[num_labels, vocab]`` in row-major order of
    ``batch.labels != -100``.

    Asks the model for just those positions (``logits_to_keep`` with a boolean mask, transformers ≥ 5),
    so the vocabulary projection is skipped for prompt tokens; models without that get the full logits,
    indexed afterwards. ``select=None`` tries the first and falls back; ``True``/``False`` forces one.
    """
    mask = batch.labels != IGNORE
    if select is None:
        select = supports_logits_to_keep(model)
    if select:
        try:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=mask).logits
        except (TypeError, IndexError, RuntimeError, ValueError):
            logits = None
        if logits is not None and logits.dim() == 2 and logits.shape[0] == int(mask.sum()):
            return logits
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]


@torch.no_grad()
def score_targets(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                  max_tokens: int | None = None, max_batch: int | None = None, progress: bool = False,
                  desc: str = "scoring") -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after ``prompts[i]`` for many pairs at once.

    Pairs are tokenised once (repeated prompts and targets are encoded once), sorted by length and run
    in right-padded batches of at most ``max_tokens`` padded tokens (``max_batch`` rows; default
    :func:`default_score_tokens` for the model's device), so short prompts are not padded to long ones.
    Pairs with the same prompt share a pass where they can (:func:`_shared_prefix_carriers`), and a
    sequence stops before its target's last token. ``max_batch=1`` runs one sequence per forward pass.
    ``model`` is the Hugging Face module (``LoadedModel.model``). Returns one :class:`TargetScore` per
    pair, in order.
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    prompt_cache: dict[str, list[int]] = {}
    target_cache: dict[str, list[int]] = {}
    p_ids = [prompt_cache.get(p) or prompt_cache.setdefault(p, encode(tokenizer, p)) for p in prompts]
    t_ids = [target_cache.get(t) or target_cache.setdefault(t, encode_target(tokenizer, t)) for t in targets]
    for i, ids in enumerate(p_ids):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to no tokens")
    context = model_context_length(model)
    if context is not None:  # prompts too long for the model keep their last tokens
        bos = getattr(tokenizer, "bos_token_id", None)
        cut = 0
        for i, (p, t) in enumerate(zip(p_ids, t_ids)):
            if len(p) + len(t) > context:
                if len(t) >= context:
                    raise ValueError(f"target {i} ({targets[i]!r}) has {len(t)} tokens; the model reads at most "
                                     f"{context}")
                p_ids[i] = fit_prompt(p, context - len(t), keep_first=bos is not None and p[0] == bos)
                cut += 1
        if cut:
            warnings.warn(f"{cut} prompt(s) with their targets are longer than the model's context of {context} "
                          "tokens; they were cut from the left", stacklevel=2)
    carriers, members = _shared_prefix_carriers(p_ids, t_ids)
    # a sequence stops before its target's last token: the logits there would predict nothing scored
    lengths = [len(p_ids[c]) + len(t_ids[c]) - 1 for c in carriers]
    device = next(model.parameters()).device
    max_tokens = max_tokens or default_score_tokens(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[TargetScore | None] = [None] * len(prompts)
    select = supports_logits_to_keep(model)
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
        for index in batches_by_tokens(lengths, max_tokens, max_batch=max_batch):
            rows = [carriers[k] for k in index]
            batch = collate_prompt_targets([p_ids[c] for c in rows], [t_ids[c] for c in rows], pad_id=pad_id,
                                           include_last_target_token=False).to(device)
            logits = labelled_logits(model, batch, select=select)  # [labels, vocab], row-major
            positions, tokens, spans = [], [], []
            start = 0
            for c, n in zip(rows, batch.target_lengths):
                for i in members[c]:
                    spans.append((i, start, len(positions)))
                    positions.extend(range(start, start + len(t_ids[i])))
                    tokens.extend(t_ids[i])
                start += n
            # one softmax per labelled position; pairs sharing a position read their own token from it
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp = logp[torch.tensor(positions, device=logits.device),
                        torch.tensor(tokens, device=logits.device)].cpu().tolist()
            argmax = logits.argmax(-1).cpu().tolist()
            for i, carrier_start, at in spans:
                n = len(t_ids[i])
                results[i] = TargetScore(tuple(t_ids[i]), tuple(logp[at:at + n]),
                                         tuple(argmax[carrier_start:carrier_start + n]))
            bar.update(len(spans))
    return results  # type: ignore[return-value]
