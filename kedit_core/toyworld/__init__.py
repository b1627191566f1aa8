"""The toy fact world: a small, fully reproducible world of invented people and their facts, a
word-level tokenizer, and a small causal LM trained here to know those facts (committed as package
data, ``kedit_core/toyworld/checkpoint``). It is what ``--model toy`` loads, and the ground on which
editors are tested::

    import kedit_core as kedit
    from kedit_core import toyworld

    model = kedit.load_model("toy")                  # the committed checkpoint (GPT-2 architecture)
    world = toyworld.load_world()                     # the world that checkpoint was trained on
    records = toyworld.make_records(world, 200)       # CounterFact-schema records (edit requests)
    report = toyworld.fact_recall(model, world)       # recall per relation and template

Importing this package is cheap (no transformers import); it registers the ``toy`` model alias.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import KeditError
from ..models import MODEL_ALIASES
from .corpus import fact_documents, filler_sentence, mention_sentence, statistics_corpus, write_corpus
from .recall import RecallReport, fact_recall, recall_matrix
from .records import make_records, object_id, record_fact, write_records
from .tokenizer import build_tokenizer
from .train import METADATA_FILE, TrainConfig, TrainResult, save_checkpoint, train_model
from .world import RELATIONS, Fact, Relation, World, WorldConfig, build_world, fill

__all__ = ["CHECKPOINT_DIR", "checkpoint_dir", "checkpoint_metadata", "load_world", "Fact", "Relation", "World",
           "WorldConfig", "RELATIONS", "build_world", "fill", "build_tokenizer", "TrainConfig", "TrainResult",
           "train_model", "save_checkpoint", "fact_recall", "recall_matrix", "RecallReport", "make_records",
           "write_records", "record_fact", "object_id", "statistics_corpus", "write_corpus", "fact_documents",
           "filler_sentence", "mention_sentence", "METADATA_FILE"]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"


def checkpoint_dir() -> str:
    """The committed toy model's ``save_pretrained`` directory (what ``load_model("toy")`` loads)."""
    if not (CHECKPOINT_DIR / METADATA_FILE).exists():
        raise KeditError(f"the toy model checkpoint is missing from {CHECKPOINT_DIR}; rebuild it with "
                         f"`kedit toyworld train --out {CHECKPOINT_DIR}`")
    return str(CHECKPOINT_DIR)


def checkpoint_metadata(model_dir: str | Path | None = None) -> dict:
    """The ``toyworld.json`` of a toy checkpoint (default: the committed one)."""
    path = Path(model_dir or checkpoint_dir()) / METADATA_FILE
    if not path.exists():
        raise KeditError(f"{path.parent} is not a toy-world checkpoint (no {METADATA_FILE})")
    return json.loads(path.read_text(encoding="utf-8"))


def load_world(model_dir: str | Path | None = None) -> World:
    """The world a toy checkpoint was trained on (default: the committed one), rebuilt from the seed and
    settings recorded in its ``toyworld.json`` and checked against the recorded content hash."""
    meta = checkpoint_metadata(model_dir)
    world = build_world(WorldConfig.from_dict(meta["world"], source=METADATA_FILE))
    if world.sha256 != meta.get("world_sha256"):
        raise KeditError(f"the toy world rebuilt from {model_dir or CHECKPOINT_DIR} differs from the one the model "
                         f"was trained on (hash {world.sha256[:12]} vs {str(meta.get('world_sha256'))[:12]}): the "
                         "generator changed since; retrain with `kedit toyworld train`")
    return world


MODEL_ALIASES.setdefault("toy", checkpoint_dir)
