"""The one training loop of the fine-tuning family, and the exact arithmetic around it.

:func:`train` runs Adam on a set of parameters over mini-batches of ``(prompt, target)`` examples; the
loss of a mini-batch is the mean over its examples of the per-token NLL of the target given the prompt,
teacher forced over all target tokens (:func:`kedit_core.text.mean_target_nll`). As in the reference
FT, ``num_steps`` is the number of passes over the data, a mini-batch whose loss is already below
``early_stop_loss`` takes no step, and training stops once a pass's mean loss is below it. The model
stays in eval mode (no dropout), so training is deterministic for given data and seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from kedit_core.models import LoadedModel
from kedit_core.text import mean_target_nll, prompt_target_batch


class Example(NamedTuple):
    """One training example: the target is scored token by token after the prompt."""

    prompt: str
    target: str


@dataclass(frozen=True)
class TrainSettings:
    num_steps: int
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 64
    early_stop_loss: float | None = 1e-2


@dataclass
class StageLog:
    """What one training run did: recorded next to the deltas."""

    name: str
    optimizer_steps: int = 0
    passes: int = 0
    pass_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    def summary(self) -> dict:
        return {"name": self.name, "optimizer_steps": self.optimizer_steps, "passes": self.passes,
                "first_loss": self.pass_losses[0] if self.pass_losses else None,
                "final_loss": self.pass_losses[-1] if self.pass_losses else None,
                "stopped_early": self.stopped_early}


# --------------------------------------------------------------------------------------------------
# Mini-batches

class FixedBatches:
    """The examples in their given order, cut into mini-batches of ``batch_size``; the same every pass."""

    def __init__(self, examples: Sequence[Example], batch_size: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.batch_size = batch_size

    def pass_batches(self, pass_index: int) -> Iterator[list[Example]]:
        for start in range(0, len(self.examples), self.batch_size):
            yield self.examples[start:start + self.batch_size]


class MixedBatches:
    """Mini-batches of the modified examples (in order, ``batch_size`` each), every one joined by
    ``round(mix_ratio · size)`` (at least one) unmodified examples drawn without replacement from a
    seeded permutation of ``unmodified`` that is reshuffled whenever it runs out."""

    def __init__(self, modified: Sequence[Example], unmodified: Sequence[Example], batch_size: int,
                 mix_ratio: float, seed: int):
        if not modified or not unmodified:
            raise ValueError("mixed batches need modified and unmodified examples")
        self.modified = FixedBatches(modified, batch_size)
        self.unmodified = list(unmodified)
        self.mix_ratio = mix_ratio
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def _draw(self, count: int) -> list[Example]:
        out = []
        while len(out) < count:
            if not self._order:
                self._order = list(range(len(self.unmodified)))
                self._rng.shuffle(self._order)
            out.append(self.unmodified[self._order.pop()])
        return out

    def unmodified_count(self, modified_count: int) -> int:
        return max(1, round(self.mix_ratio * modified_count))

    def pass_batches(self, pass_index: int) -> Iterator[list[Example]]:
        for chunk in self.modified.pass_batches(pass_index):
            yield list(chunk) + self._draw(self.unmodified_count(len(chunk)))


# --------------------------------------------------------------------------------------------------
# Training

# Padded tokens per forward/backward. Training every block of SmolLM2-135M holds about 2 MB per token
# (activations of 30 blocks and the full-vocabulary logits), so 2,048 tokens keep a step near 4 GB above the
# weights and Adam's state; a 64-example CounterFact mini-batch (~1,000 tokens) stays one micro-batch.
MICRO_BATCH_TOKENS = 2048


def micro_batches(model: LoadedModel, examples: Sequence[Example],
                  max_tokens: int = MICRO_BATCH_TOKENS) -> list[list[Example]]:
    """Consecutive runs of ``examples`` whose padded size (examples × longest prompt+target, in tokens)
    stays within ``max_tokens``; an example longer than that is a micro-batch of its own."""
    lengths = [len(model.tokenizer(e.prompt + e.target, add_special_tokens=True)["input_ids"]) for e in examples]
    out: list[list[Example]] = []
    current: list[Example] = []
    longest = 0
    for example, length in zip(examples, lengths):
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            out.append(current)
            current, longest = [], 0
        current.append(example)
        longest = max(longest, length)
    if current:
        out.append(current)
    return out


def batch_loss(model: LoadedModel, examples: Sequence[Example]) -> torch.Tensor:
    """Mean over the examples of each target's per-token NLL given its prompt (teacher forced)."""
    enc = prompt_target_batch(model.tokenizer, [e.prompt for e in examples], [e.target for e in examples],
                              include_last_target_token=False).to(model.device)
    logits = model.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False).logits
    return mean_target_nll(logits, enc.labels).mean()


def train(model: LoadedModel, params: dict[str, nn.Parameter], batches, settings: TrainSettings, *,
          after_step: Callable[[], None] | None = None, progress: bool = True, name: str = "ft") -> StageLog:
    """Adam on ``params`` (trained in place; the caller restores them) over ``batches.pass_batches(i)``
    for ``settings.num_steps`` passes. ``after_step`` runs after every mini-batch (FT-L's projection).
    Every parameter's ``requires_grad`` flag is restored afterwards and the gradients are dropped."""
    log = StageLog(name)
    net = model.model
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    try:
        net.requires_grad_(False)
        trained = list(params.values())
        for p in trained:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(trained, lr=settings.lr, weight_decay=settings.weight_decay)
        threshold = settings.early_stop_loss
        with tqdm(total=settings.num_steps, desc=name, unit="pass", disable=not progress, leave=False) as bar, \
                torch.enable_grad():
            for pass_index in range(settings.num_steps):
                total, count = 0.0, 0
                for examples in batches.pass_batches(pass_index):
                    optimizer.zero_grad(set_to_none=True)
                    parts = micro_batches(model, examples, MICRO_BATCH_TOKENS)
                    if len(parts) == 1:   # the loss decides first whether a backward pass is needed
                        loss = batch_loss(model, examples)
                        value = float(loss.detach())
                        step = threshold is None or value >= threshold
                        if step:
                            loss.backward()
                    else:                 # each part's graph is freed by its backward before the next
                        value = 0.0
                        for part in parts:
                            loss = batch_loss(model, part) * (len(part) / len(examples))
                            loss.backward()
                            value += float(loss.detach())
                        step = threshold is None or value >= threshold
                    total += value * len(examples)
                    count += len(examples)
                    if step:
                        optimizer.step()
                        log.optimizer_steps += 1
                    if after_step is not None:
                        after_step()
                mean = total / max(count, 1)
                log.passes += 1
                log.pass_losses.append(mean)
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4g}")
                if threshold is not None and mean < threshold:
                    log.stopped_early = True
                    break
    finally:
        for n, p in net.named_parameters():
            p.grad = None
            if n in flags:
                p.requires_grad_(flags[n])
    return log


# --------------------------------------------------------------------------------------------------
# Exact arithmetic on weights

def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """A dtype in which the difference of two ``dtype`` values is (practically) exact, so that
    ``original + (final − original)`` rounds back to ``final``: float64 for float32/64, float32 for
    16-bit floats."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def exact_difference(final: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``final − original`` in :func:`wide_dtype`, so applying it as a delta reproduces ``final``."""
    wide = wide_dtype(original.dtype)
    return final.detach().to(wide) - original.detach().to(wide)


def linf_ball(theta0: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds ``lo, hi`` in ``theta0``'s dtype with ``θ0 − r ≤ lo ≤ θ0 ≤ hi ≤ θ0 + r`` exactly.

    Rounding ``θ0 ± r`` to float32/bf16 may land just outside the ball; such a bound is moved one
    representable step towards ``θ0``. Distances are measured in float64, where the difference of two
    16/32-bit floats near each other is exact."""
    t64 = theta0.detach().double()
    lo = (t64 - radius).to(theta0.dtype)
    hi = (t64 + radius).to(theta0.dtype)
    for _ in range(4):  # one step always suffices; the loop guards against pathological inputs
        lo_out = (t64 - lo.double()) > radius
        hi_out = (hi.double() - t64) > radius
        if not (lo_out.any() or hi_out.any()):
            break
        lo = torch.where(lo_out, torch.nextafter(lo, theta0), lo)
        hi = torch.where(hi_out, torch.nextafter(hi, theta0), hi)
    return lo, hi


def max_abs_change(final: torch.Tensor, original: torch.Tensor) -> float:
    """``max |final − original|`` in float64."""
    if final.numel() == 0:
        return 0.0
    return float((final.detach().double() - original.detach().double()).abs().max())
