"""kedit's fine-tuning editors: ``ft`` (plain fine-tuning of chosen layers), ``ft-l`` (constrained,
Zhu et al. 2020), ``ft-mix`` (new facts mixed with unmodified ones) and ``f-learning`` (forget the old
facts, then learn the new ones; Ni et al.), registered through the ``kedit`` entry-point group.

They share one training loop (:mod:`.training`), one parameter selection (:mod:`.selection`) and one
LoRA wrapper around peft (:mod:`.lora`); their published defaults are JSON files under ``defaults/``.
"""
from __future__ import annotations

import kedit_core

from .editors import EDITORS, ConstrainedFineTune, FineTune, FLearning, MixedFineTune
from .hparams import ConstrainedFTHParams, FineTuneHParams, FLearningHParams, MixedFTHParams

__all__ = ["ConstrainedFineTune", "ConstrainedFTHParams", "FineTune", "FineTuneHParams", "FLearning",
           "FLearningHParams", "MixedFineTune", "MixedFTHParams"]


@kedit_core.hookimpl
def register_editors(register):
    for editor in EDITORS:
        register(editor)
