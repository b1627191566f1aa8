"""The four editors of the fine-tuning family: ``ft``, ``ft-l``, ``ft-mix`` and ``f-learning``.

Each trains the selected parameters of the model in place with the shared loop
(:func:`.training.train`) inside :func:`kedit_core.deltas.preserved_weights`, returns the difference
between the trained and the original weights as deltas (in a dtype wide enough that applying them
reproduces the trained weights bit for bit), and leaves the model exactly as it found it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kedit_core import Deltas, EditContext, EditResult, Editor, EditRequest, LoadedModel
from kedit_core.deltas import preserved_weights
from kedit_core.editors import PhaseTimer
from kedit_core.errors import HyperParamsError, KeditRuntimeError
from kedit_core.hparams import HyperParams, find_model_defaults

from .facts import new_facts, old_facts, resolve_unmodified_facts
from .hparams import ConstrainedFTHParams, FineTuneHParams, FLearningHParams, MixedFTHParams
from .lora import lora_adapters, lora_target_modules
from .selection import select_parameters
from .training import (
    FixedBatches, MixedBatches, StageLog, TrainSettings, exact_difference, linf_ball, max_abs_change, train,
)

DEFAULTS_DIR = Path(__file__).parent / "defaults"
KEEP_STAGE_DELTAS = "keep_stage_deltas"  # EditContext option: F-Learning also returns θ' − θ in info


def selected_parameters(model: LoadedModel, hp: HyperParams) -> dict[str, nn.Parameter]:
    return select_parameters(model, layers=hp.layers, module=hp.module, params=hp.params,
                             include_biases=hp.include_biases)


class _FineTuningEditor(Editor):
    """Shared plumbing: published per-model defaults and the parameter-selection check."""

    @classmethod
    def default_hparams(cls, model: LoadedModel) -> HyperParams:
        path = find_model_defaults(DEFAULTS_DIR / cls.name, model)
        return cls.HParams.from_json(path) if path is not None else cls.HParams()

    @classmethod
    def check_hparams(cls, hparams: HyperParams, model: LoadedModel) -> None:
        selected_parameters(model, hparams)


# --------------------------------------------------------------------------------------------------
# FT, FT-L, FT-Mix: one training run on the new facts

class FineTune(_FineTuningEditor):
    """Unconstrained fine-tuning of the chosen parameters on the new facts."""

    name = "ft"
    summary = "fine-tune chosen layers/modules on the new facts (Adam, teacher-forced target NLL)"
    HParams = FineTuneHParams

    def batches(self, model: LoadedModel, requests: Sequence[EditRequest], context: EditContext, extra: dict):
        return FixedBatches(new_facts(requests), self.hparams.batch_size)

    def projection(self, params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor]):
        """What runs after every optimizer step (FT-L projects); None for plain FT."""
        return None

    def check_trained(self, params: dict[str, nn.Parameter], originals: dict[str, torch.Tensor], extra: dict) -> None:
        """Checks on the trained weights before they are restored (FT-L checks its bound)."""

    def compute(self, model: LoadedModel, requests: Sequence[EditRequest], context: EditContext) -> EditResult:
        hp = self.hparams
        timer = PhaseTimer()
        extra: dict = {}
        params = selected_parameters(model, hp)
        batches = self.batches(model, requests, context, extra)
        settings = TrainSettings(hp.num_steps, hp.lr, hp.weight_decay, hp.batch_size, hp.early_stop_loss)
        with preserved_weights(model.model, params):
            originals = {n: p.detach().clone() for n, p in params.items()}
            with timer("train"):
                log = train(model, params, batches, settings, after_step=self.projection(params, originals),
                            progress=context.progress, name=self.name)
            self.check_trained(params, originals, extra)
            tensors = {n: exact_difference(p, originals[n]) for n, p in params.items()}
        extra.update({"trained_parameters": list(params), "stages": [log.summary()]})
        context.say(f"{self.name}: {log.optimizer_steps} Adam steps over {log.passes} passes, "
                    f"loss {log.summary()['first_loss']} -> {log.summary()['final_loss']}")
        return EditResult(Deltas(tensors, extra=extra), timings=timer.seconds,
                          info={"stages": [log], "trained_parameters": list(params)})


class ConstrainedFineTune(FineTune):
    """FT-L (Zhu et al. 2020): projected gradient descent inside an ℓ∞ ball of radius δ around θ0."""

    name = "ft-l"
    summary = "constrained fine-tuning: every trained weight kept within ±norm_constraint of its original"
    HParams = ConstrainedFTHParams

    def projection(self, params, originals):
        bounds = {n: linf_ball(originals[n], self.hparams.norm_constraint) for n in params}

        @torch.no_grad()
        def project() -> None:
            for n, p in params.items():
                lo, hi = bounds[n]
                p.clamp_(min=lo, max=hi)
        return project

    def check_trained(self, params, originals, extra):
        radius = self.hparams.norm_constraint
        worst = max((max_abs_change(p, originals[n]) for n, p in params.items()), default=0.0)
        if worst > radius:
            raise KeditRuntimeError(f"ft-l: a trained weight moved by {worst!r}, outside the bound {radius!r} "
                             "(a bug in the projection)")
        extra.update({"norm_constraint": radius, "max_abs_change": worst})


class MixedFineTune(FineTune):
    """FT on mini-batches that mix the modified facts with unmodified ones (Zhu et al.'s FT+mix baseline)."""

    name = "ft-mix"
    summary = "fine-tune on the new facts mixed with unmodified facts in every mini-batch"
    HParams = MixedFTHParams

    def batches(self, model, requests, context, extra):
        hp = self.hparams
        facts = resolve_unmodified_facts(hp.unmodified_facts, context.options, requests)
        extra["unmodified_facts"] = facts.describe()
        extra["mix"] = {"mix_ratio": hp.mix_ratio, "seed": context.seed,
                        "sampler": "seeded permutation without replacement, reshuffled when exhausted"}
        return MixedBatches(new_facts(requests), facts.examples, hp.batch_size, hp.mix_ratio, seed=context.seed)


# --------------------------------------------------------------------------------------------------
# F-Learning: forget the old facts, then learn the new ones

@dataclass
class StageResult:
    """One F-Learning stage: the float64 change it stands for (``knowledge``: trained − start, or LoRA's
    ``B·A·scaling``) for each parameter it changes, the weights it ends at, and its log."""

    knowledge: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    log: StageLog
    method: str


def run_stage(model: LoadedModel, params: dict[str, nn.Parameter], examples, *, method: str,
              settings: TrainSettings, lora_rank: int, lora_alpha: float, seed: int, name: str,
              progress: bool) -> StageResult:
    """Fine-tune ``params`` (full) or LoRA adapters on their linear layers (lora) on ``examples``,
    starting from the parameters' current values. Full training leaves the trained values in the
    parameters; LoRA leaves the parameters untouched (and the model unwrapped)."""
    batches = FixedBatches(examples, settings.batch_size)
    start = {n: p.detach().clone() for n, p in params.items()}
    if method == "full":
        log = train(model, params, batches, settings, progress=progress, name=f"{name} (full)")
        knowledge = {n: p.detach().double() - start[n].double() for n, p in params.items()}
        final = {n: p.detach().clone() for n, p in params.items()}
    elif method == "lora":
        targets = lora_target_modules(model.model, params)
        with lora_adapters(model.model, targets, rank=lora_rank, alpha=lora_alpha, seed=seed) as adapters:
            log = train(model, adapters.trainable_parameters(), batches, settings, progress=progress,
                        name=f"{name} (lora)")
            knowledge = adapters.weight_deltas()
        final = {n: (start[n].double() + knowledge[n]).to(start[n].dtype) for n in knowledge}
    else:
        raise HyperParamsError(f"stage method {method!r}: expected 'full' or 'lora'")
    return StageResult(knowledge, final, log, method)


def subtract_knowledge(base: dict[str, torch.Tensor], knowledge: dict[str, torch.Tensor],
                       scale: float) -> dict[str, torch.Tensor]:
    """F-Learning's forgetting step ``θ' = θ − λ·(θ_old − θ)`` for every parameter in ``knowledge``
    (float64 ``θ_old − θ``): computed in float64 and rounded once to each parameter's dtype."""
    return {n: (base[n].double() - scale * knowledge[n]).to(base[n].dtype) for n in knowledge}


class FLearning(_FineTuningEditor):
    """F-Learning (Ni et al.): forget the old facts by subtracting what fine-tuning on them adds, then
    fine-tune the result on the new facts. Each stage is full fine-tuning or LoRA (peft).

    With ``EditContext(options={"keep_stage_deltas": True})`` the result's ``info["forget_deltas"]``
    also holds ``θ' − θ`` (the model after forgetting, before learning), for studies of stage 1."""

    name = "f-learning"
    summary = "forget the old facts (θ − λ·ΔFT_old), then learn the new ones; full or LoRA per stage"
    HParams = FLearningHParams

    @classmethod
    def check_hparams(cls, hparams: FLearningHParams, model: LoadedModel) -> None:
        params = selected_parameters(model, hparams)
        if "lora" in (hparams.forget_method, hparams.learn_method) and not lora_target_modules(model.model, params):
            raise HyperParamsError("a LoRA stage needs linear layers among the selected parameters; "
                                   f"module = {hparams.module!r}, layers = {hparams.layers}, params = {hparams.params} "
                                   "select none")

    def compute(self, model: LoadedModel, requests: Sequence[EditRequest], context: EditContext) -> EditResult:
        hp = self.hparams
        timer = PhaseTimer()
        old, new = old_facts(requests), new_facts(requests)
        params = selected_parameters(model, hp)
        seeds = {"forget": context.seed, "learn": context.seed + 1}
        common = dict(lora_rank=hp.lora_rank, lora_alpha=hp.lora_alpha, progress=context.progress)
        with preserved_weights(model.model, params):
            originals = {n: p.detach().clone() for n, p in params.items()}
            with timer("forget"):
                forget = run_stage(
                    model, params, old, method=hp.forget_method, seed=seeds["forget"], name="f-learning forget",
                    settings=TrainSettings(hp.forget_num_steps, hp.forget_lr, hp.weight_decay, hp.batch_size,
                                           hp.forget_early_stop_loss), **common)
                forgotten = subtract_knowledge(originals, forget.knowledge, hp.forget_scale)
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(forgotten.get(n, originals[n]))
            with timer("learn"):
                learn = run_stage(
                    model, params, new, method=hp.learn_method, seed=seeds["learn"], name="f-learning learn",
                    settings=TrainSettings(hp.learn_num_steps, hp.learn_lr, hp.weight_decay, hp.batch_size,
                                           hp.learn_early_stop_loss), **common)
                with torch.no_grad():
                    for n, w in learn.final.items():
                        params[n].copy_(w)
            changed = [n for n in params if n in forget.knowledge or n in learn.knowledge]
            tensors = {n: exact_difference(params[n], originals[n]) for n in changed}
        stages = [dict(forget.log.summary(), method=forget.method, seed=seeds["forget"]),
                  dict(learn.log.summary(), method=learn.method, seed=seeds["learn"])]
        extra = {"trained_parameters": changed, "stages": stages, "forget_scale": hp.forget_scale,
                 "forget_knowledge_norm": float(sum(float(k.norm()) ** 2 for k in forget.knowledge.values()) ** 0.5)}
        info = {"stages": [forget.log, learn.log], "trained_parameters": changed}
        if context.options.get(KEEP_STAGE_DELTAS):
            info["forget_deltas"] = Deltas({n: exact_difference(w, originals[n]) for n, w in forgotten.items()},
                                           editor=f"{self.name}:forget", extra={"forget_scale": hp.forget_scale})
        return EditResult(Deltas(tensors, extra=extra), timings=timer.seconds, info=info)


EDITORS = (FineTune, ConstrainedFineTune, MixedFineTune, FLearning)
