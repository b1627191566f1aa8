"""Context templates: the random prefixes under which keys are read and values optimised.

A template holds exactly one ``{}``, where the request's prompt goes (``"The sky was clear. {}"``);
templates come in *groups*. MEMIT averages a request's keys within each group and then across groups
(the bare group ``["{}"]`` therefore weighs as much as all the prefixed ones together); ROME takes a
plain mean over all templates. The reference code samples the prefixes from the model once per
process, unseeded; kedit draws them with a seeded generator (so runs reproduce), records them next to
the result, and accepts an explicit list (``--context-templates FILE.json``, a JSON list of groups:
``[["{}"], ["The sky. {}", "Because of this. {}"]]``).
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import KeditError
from ..text import cache_kwargs, encode, output_cache

__all__ = ["TemplateRecipe", "MEMIT_RECIPE", "rome_recipe", "generate_context_templates", "validate_template_groups",
           "load_context_templates", "resolve_context_templates", "flatten_templates", "fill_template"]

TemplateGroups = list[list[str]]


@dataclass(frozen=True)
class TemplateRecipe:
    """How the reference draws its prefixes: for each ``(max_tokens, count)`` in ``lengths``, ``count``
    top-k samples split evenly over ``seed_prompts`` (``None`` = the tokenizer's BOS/EOS token, ROME's
    ``"<|endoftext|>"``), each at most ``max_tokens`` tokens long including the seed prompt; every
    length makes one group, after the bare group ``["{}"]``."""

    name: str
    seed_prompts: tuple[str, ...] | None
    lengths: tuple[tuple[int, int], ...]
    top_k: int = 5


# memit_main.get_context_templates: 5 prefixes of <= 10 tokens seeded by these words.
MEMIT_RECIPE = TemplateRecipe("memit", ("The", "Therefore", "Because", "I", "You"), ((10, 5),))


def rome_recipe(length_params: Sequence[Sequence[int]] = ((5, 10), (10, 10))) -> TemplateRecipe:
    """rome_main.get_context_templates: ``context_template_length_params`` pairs (max tokens, count),
    sampled after the end-of-text token."""
    return TemplateRecipe("rome", None, tuple((int(length), int(count)) for length, count in length_params))


def _clean(text: str) -> str:
    # generate_fast's post-processing, then braces removed so the template keeps exactly one slot.
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    return text.replace("{", " ").replace("}", " ")


@torch.no_grad()
def _sample(model, prompt: str, count: int, max_tokens: int, top_k: int, generator: torch.Generator) -> list[str]:
    tok = model.tokenizer
    ids = encode(tok, prompt)
    if not ids:
        raise KeditError(f"context templates: the seed prompt {prompt!r} tokenises to nothing")
    batch = torch.tensor([ids] * count, dtype=torch.long, device=model.device)
    step, past = batch, None
    while batch.shape[1] < max_tokens:
        # One new token per step: the KV cache holds the rest, and only the last position's logits are made.
        output = model.model(input_ids=step, use_cache=True, logits_to_keep=1, **cache_kwargs(model.model, past))
        past = output_cache(output)
        logits = output.logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, top_k, dim=-1)
        weights = (top.values / top.values.sum(-1, keepdim=True)).cpu()
        # Sampled on the CPU so a seed gives the same draws on every device (for equal probabilities).
        choice = torch.multinomial(weights, 1, generator=generator).to(top.indices.device)
        step = top.indices.gather(1, choice)
        batch = torch.cat([batch, step], dim=1)
    return [_clean(tok.decode(row, skip_special_tokens=True)) for row in batch.tolist()]


def generate_context_templates(model, recipe: TemplateRecipe, seed: int) -> TemplateGroups:
    """Sample the recipe's prefixes from ``model`` (a LoadedModel) with top-k sampling seeded by
    ``seed``, and return the template groups ``[["{}"], ["<prefix>. {}", ...], ...]``."""
    tok = model.tokenizer
    prompts = recipe.seed_prompts
    if prompts is None:
        start = getattr(tok, "bos_token", None) or getattr(tok, "eos_token", None)
        if start is None:
            raise KeditError("context templates: the tokenizer has neither a BOS nor an EOS token to start from; "
                             "pass the templates explicitly (--context-templates FILE.json)")
        prompts = (start,)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    groups: TemplateGroups = [["{}"]]
    for max_tokens, count in recipe.lengths:
        per_prompt = count // len(prompts)
        texts: list[str] = []
        for prompt in prompts:
            if per_prompt > 0:
                texts.extend(_sample(model, prompt, per_prompt, max_tokens, recipe.top_k, generator))
        groups.append([text + ". {}" for text in texts])
    return validate_template_groups(groups, source=f"{recipe.name} templates")


def validate_template_groups(data: Any, *, source: str = "context templates") -> TemplateGroups:
    """Check a list of template groups (each a non-empty list of strings with exactly one ``{}``)."""
    if not isinstance(data, list) or not data:
        raise KeditError(f"{source}: expected a non-empty JSON list of template groups, e.g. "
                         '[["{}"], ["The sky. {}", "Because of this. {}"]]; got ' + repr(data)[:80])
    groups: TemplateGroups = []
    for g, group in enumerate(data):
        if not isinstance(group, list) or not group:
            raise KeditError(f"{source}: group {g} must be a non-empty list of template strings; got {group!r}")
        for t, template in enumerate(group):
            if not isinstance(template, str) or template.count("{}") != 1:
                raise KeditError(f"{source}: group {g}, template {t} must be a string with exactly one '{{}}' "
                                 f"(where the prompt goes); got {template!r}")
        groups.append(list(group))
    return groups


def load_context_templates(path: str | Path) -> TemplateGroups:
    """Read template groups from a JSON file."""
    from ..requests import read_json_file

    path = Path(path)
    return validate_template_groups(read_json_file(path, what="context templates file", error=KeditError),
                                    source=str(path))


def resolve_context_templates(model, recipe: TemplateRecipe, context) -> tuple[TemplateGroups, dict]:
    """The explicit templates of an :class:`~kedit_core.editors.EditContext` if it has them, otherwise
    ones drawn from the model with the context's seed. Returns the groups and a record of where they
    came from (stored in the deltas' metadata)."""
    if context.context_templates is not None:
        return validate_template_groups(context.context_templates), {"source": "given"}
    groups = generate_context_templates(model, recipe, context.seed)
    return groups, {"source": "sampled", "recipe": recipe.name, "seed": int(context.seed),
                    "lengths": [list(x) for x in recipe.lengths]}


def flatten_templates(groups: TemplateGroups) -> list[str]:
    return [template for group in groups for template in group]


def fill_template(template: str, prompt: str) -> str:
    """Put ``prompt`` (which holds the subject's ``{}``) into ``template``'s slot."""
    head, tail = template.split("{}", 1)
    return head + prompt + tail
