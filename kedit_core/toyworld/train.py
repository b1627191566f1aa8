"""Training the toy model: a small transformers causal LM that learns the toy world's facts.

The model reads documents of fact sentences (every fact under every template, once per pass, in a
fresh random order) mixed with filler and mention sentences, packed into rows that start at sentence
boundaries, with a random position offset per row so all position embeddings are trained and facts
are recalled wherever they occur (after MEMIT/ROME context prefixes too). Plain next-token loss on
every token. Everything is seeded; the settings, the world's hash and the measured recall are
written next to the weights (``toyworld.json``)::

    result = train_model(build_world(), TrainConfig())
    save_checkpoint(result, "toy-model")
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from ..errors import KeditError
from ..hparams import HyperParams
from .corpus import fact_documents
from .recall import RecallReport, fact_recall
from .tokenizer import build_tokenizer
from .world import World

__all__ = ["TrainConfig", "TrainResult", "model_config", "train_model", "save_checkpoint", "METADATA_FILE"]

METADATA_FILE = "toyworld.json"


@dataclass(frozen=True)
class TrainConfig(HyperParams):
    """Model shape and optimisation settings for the toy model (defaults: the committed checkpoint)."""

    family: Literal["gpt2", "llama"] = "gpt2"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    mlp_ratio: int = 4                  # d_ff = mlp_ratio * hidden_size
    context_length: int = 128
    tie_embeddings: bool = True
    seq_len: int = 64                   # training row length (tokens)
    batch_size: int = 32                # rows per step
    steps: int = 1200
    lr: float = 3e-3
    min_lr_ratio: float = 0.05          # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 40
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    filler_fraction: float = 0.1        # chance of a filler sentence before each fact sentence
    mention_fraction: float = 0.05      # chance of a subject mention before each fact sentence
    zero_offset_fraction: float = 0.5   # rows placed at position 0 (the rest at a random offset)
    # Curriculum: the first warmup_subject_steps steps see only the facts of warmup_subjects subjects.
    # The recall circuit forms on few individuals much sooner, which shortens the plateau before
    # facts are learnt (Zucchet et al. 2025, "How do language models learn facts?").
    warmup_subjects: int = 100
    warmup_subject_steps: int = 60
    seed: int = 0
    eval_every: int = 0                 # measure recall every N steps (0: only at the end)

    def validate(self):
        for name in ("num_layers", "hidden_size", "num_heads", "mlp_ratio", "seq_len", "batch_size", "steps"):
            self.require(getattr(self, name) > 0, name, "must be positive")
        self.require(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        self.require(self.seq_len <= self.context_length, "seq_len", "must not exceed context_length")
        self.require(self.lr > 0, "lr", "must be positive")
        self.require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        for name in ("filler_fraction", "mention_fraction", "zero_offset_fraction"):
            self.require(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")


def model_config(cfg: TrainConfig, tokenizer):
    """The transformers config for ``cfg`` (GPT-2: GELU MLP, d_ff = 4d; Llama: SwiGLU, RoPE)."""
    from transformers import GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=cfg.tie_embeddings)
    d_ff = cfg.mlp_ratio * cfg.hidden_size
    if cfg.family == "gpt2":
        return GPT2Config(n_layer=cfg.num_layers, n_embd=cfg.hidden_size, n_head=cfg.num_heads, n_inner=d_ff,
                          n_positions=cfg.context_length, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    return LlamaConfig(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads, intermediate_size=d_ff,
                       max_position_embeddings=cfg.context_length, **ids)


class _RowStream:
    """Packs training documents into ``[batch, seq_len]`` rows, pass after pass over the facts.

    Several documents share a row, but each attends only to itself (a block-diagonal causal mask) and
    has its own positions (starting at 0, or at a random offset so every position embedding is
    trained), so no document ever sees another subject's text; a row's tail is padding."""

    def __init__(self, world: World, tokenizer, cfg: TrainConfig):
        self.world, self.tokenizer, self.cfg = world, tokenizer, cfg
        self.rng = random.Random(f"kedit-toyworld-train-{cfg.seed}")
        self.rows: list[list[list[int]]] = []   # row -> its documents' token ids
        self.passes = 0
        self.tokens = 0
        self.warming = False

    def _next_pass(self, subjects=None) -> None:
        docs = fact_documents(self.world, self.rng, filler_fraction=self.cfg.filler_fraction,
                              mention_fraction=self.cfg.mention_fraction, subjects=subjects)
        # A document longer than a row is split between sentences (never truncated: every fact
        # sentence of the pass is trained on).
        eos, limit = self.tokenizer.eos_token_id, self.cfg.seq_len
        encoded = self.tokenizer([" ".join(doc) for doc in docs], add_special_tokens=False)["input_ids"]
        pieces, stack = [], [(doc, ids) for doc, ids in zip(docs, encoded)][::-1]
        while stack:
            doc, ids = stack.pop()
            if len(ids) + 1 > limit and len(doc) > 1:
                half = len(doc) // 2
                for part in (doc[half:], doc[:half]):
                    stack.append((part, self.tokenizer(" ".join(part), add_special_tokens=False)["input_ids"]))
            else:
                pieces.append((ids + [eos])[:limit])
        # First-fit packing: each piece goes to the first open row with room, so rows are nearly full.
        rows: list[list[list[int]]] = []
        room: list[int] = []
        for ids in pieces:
            slot = next((r for r in range(max(0, len(rows) - 64), len(rows)) if room[r] >= len(ids)), None)
            if slot is None:
                rows.append([])
                room.append(limit)
                slot = len(rows) - 1
            rows[slot].append(ids)
            room[slot] -= len(ids)
        self.rows.extend(rows)
        if subjects is None:
            self.passes += 1

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        warming = step < cfg.warmup_subject_steps and cfg.warmup_subjects > 0
        if not warming and self.warming:   # the curriculum ends: drop its leftover rows
            self.rows = []
        self.warming = warming
        while len(self.rows) < cfg.batch_size:
            self._next_pass(self.world.subjects[: cfg.warmup_subjects] if warming else None)
        rows, self.rows = self.rows[: cfg.batch_size], self.rows[cfg.batch_size:]
        shape = (len(rows), cfg.seq_len)
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, -100, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment = torch.full(shape, -1, dtype=torch.long)
        for b, docs in enumerate(rows):
            start = 0
            for d, ids in enumerate(docs):
                end = start + len(ids)
                input_ids[b, start:end] = torch.tensor(ids)
                labels[b, start + 1:end] = input_ids[b, start + 1:end]  # a document's first token is not predicted
                offset = 0
                if self.rng.random() >= cfg.zero_offset_fraction:
                    offset = self.rng.randint(0, cfg.context_length - len(ids))
                position_ids[b, start:end] = torch.arange(len(ids)) + offset
                segment[b, start:end] = d
                start = end
                self.tokens += len(ids)
        causal = torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool).tril()
        same_doc = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment >= 0).unsqueeze(2)
        mask = (same_doc & causal) | torch.eye(cfg.seq_len, dtype=torch.bool)  # padding attends to itself
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "attention_mask": mask.unsqueeze(1)}


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    world: World
    config: TrainConfig
    recall: RecallReport
    seconds: float
    history: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(world: World, cfg: TrainConfig | None = None, *, progress: bool = True,
                log: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> TrainResult:
    """Train a fresh model on ``world`` (seeded by ``cfg.seed``) and measure its recall. The model is
    initialised on the CPU (the same weights on every device) and trained on ``device``; the data order
    does not depend on the device, the arithmetic does (a CUDA run is not bit-identical to a CPU run)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    cfg = cfg or TrainConfig()
    tokenizer = build_tokenizer(world, model_max_length=cfg.context_length)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, tokenizer)).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    stream = _RowStream(world, tokenizer, cfg)
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="training toy model", unit="step", disable=not progress)
    running = None
    for step in bar:
        lr = _lr_at(step, cfg)
        for group in optim.param_groups:
            group["lr"] = lr
        loss = model(**{k: v.to(device) for k, v in stream.batch(step).items()}).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.set_postfix(loss=f"{running:.3f}", passes=stream.passes)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            report = fact_recall(model, world, tokenizer=tokenizer)
            model.train()
            entry = {"step": step + 1, "loss": running, "recall": report.overall, "worst": report.worst[2],
                     "seconds": time.perf_counter() - start}
            history.append(entry)
            if log:
                log(f"step {step + 1}: loss {running:.3f}, recall {report.overall:.4f} (worst template "
                    f"{report.worst[2]:.4f}), {entry['seconds']:.0f} s")
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    model.requires_grad_(False)
    report = fact_recall(model, world, tokenizer=tokenizer)
    history.append({"step": cfg.steps, "loss": running, "recall": report.overall, "worst": report.worst[2],
                    "seconds": seconds})
    info = {"train_seconds": round(seconds, 1), "passes_over_facts": stream.passes, "tokens_seen": stream.tokens,
            "torch_threads": torch.get_num_threads(), "final_loss": running,
            "parameters": sum(p.numel() for p in model.parameters())}
    return TrainResult(model, tokenizer, world, cfg, report, seconds, history, info)


def save_checkpoint(result: TrainResult, out_dir: str | os.PathLike, *, command: str | None = None) -> Path:
    """Write the model, tokenizer and ``toyworld.json`` as a ``save_pretrained`` directory, atomically
    (built beside ``out_dir`` and swapped in)."""
    import transformers

    from .._version import __version__

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    result.model.save_pretrained(tmp)
    result.tokenizer.save_pretrained(tmp)
    metadata = {
        "world": result.world.config.to_dict(),
        "world_sha256": result.world.sha256,
        "world_size": {k: v for k, v in result.world.summary().items() if k != "sha256"},
        "train": result.config.to_dict(),
        "recall": result.recall.to_dict(),
        "history": result.history,
        "info": result.info,
        "command": command,
        "versions": {"kedit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        if not out.is_dir():
            raise KeditError(f"{out} exists and is not a directory")
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out
