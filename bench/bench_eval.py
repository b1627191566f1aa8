"""Benchmark: scoring CounterFact records batched by tokens vs one prompt at a time.

A GPT-2-small-shaped model (12 layers, d=768, 12 heads, GPT-2's 50,257-token vocabulary; random
weights, kedit's test tokenizer) scores the probability metrics of CounterFact records (each record:
1 rewrite + 2 paraphrase + 10 neighbourhood prompts, each against the new and the true target = 26
teacher-forced scores) three ways, and prints records/s side by side:

- one prompt at a time: one forward per (prompt, target) pair (``max_batch=1``);
- one record per batch: the reference's layout (all of a record's prompts in one padded batch);
- batched by tokens: all prompts of all records, sorted by length, in padded batches of at most
  ``--batch-tokens`` tokens (what ``kedit eval`` does; give several budgets, comma-separated, to see
  which suits the device; the default is kedit's default for the device).

The slow modes run on the first ``--slow-records`` records (their rate is per record, so it compares
directly). The script also checks that all modes give the same NLLs.

    python bench/bench_eval.py                       # 300 records, CPU
    python bench/bench_eval.py --device cuda --records 1000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kedit_core.evaluation import load_cases, score_counterfact
from kedit_core.models import wrap_model
from kedit_core.testing import test_tokenizer, tiny_config
from kedit_core.text import default_score_tokens

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "counterfact_dev.json"


def gpt2_small(device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    config = tiny_config("gpt2", num_layers=12, hidden_size=768, context_length=1024, vocab_size=50257)
    config.n_head = 12
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device=device, dtype=dtype)
    return wrap_model(model, test_tokenizer(), source="gpt2-small-shaped (random)")


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def nlls(records):
    return [v for r in records for section in r["nll"].values() for pair in section for v in pair.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--slow-records", type=int, default=20, help="records for the two slow modes")
    parser.add_argument("--batch-tokens", help="token budget(s) per batch, e.g. 256,512,2048 (default: kedit's "
                                                  "default for the device)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    m = gpt2_small(args.device, getattr(torch, args.dtype))
    _, cases = load_cases(DATA, "counterfact", limit=args.records)
    slow = cases[:args.slow_records]
    n_pairs = sum(2 * (1 + len(c.paraphrase_prompts) + len(c.neighborhood_prompts)) for c in cases)
    print(f"model: GPT-2-small shape (12 layers, d=768, vocab 50257), {args.dtype} on {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"data: {len(cases)} CounterFact records = {n_pairs} teacher-forced scores")

    budgets = ([int(b) for b in args.batch_tokens.split(",")] if args.batch_tokens
               else [default_score_tokens(m.device)])
    score_counterfact(m.model, m.tokenizer, cases[:2])  # warm-up
    print(f"\n{'mode':<30} {'records':>8} {'seconds':>9} {'records/s':>10} {'vs one-at-a-time':>17}", flush=True)
    base = None

    def row(name, n, seconds):
        nonlocal base
        rate = n / seconds
        base = base or rate
        print(f"{name:<30} {n:>8} {seconds:>9.2f} {rate:>10.2f} {rate / base:>16.1f}x", flush=True)

    single, t = timed(lambda: score_counterfact(m.model, m.tokenizer, slow, max_batch=1))
    row("one prompt at a time", len(slow), t)
    per_record, t = timed(lambda: [r for c in slow for r in score_counterfact(m.model, m.tokenizer, [c],
                                                                              max_tokens=10 ** 9)])
    row("one record per batch", len(slow), t)
    for budget in budgets:
        batched, t = timed(lambda: score_counterfact(m.model, m.tokenizer, cases, max_tokens=budget))
        row(f"batched by tokens ({budget})", len(cases), t)

    ref = nlls(batched[:len(slow)])
    diff = max(max(abs(a - b) for a, b in zip(ref, nlls(other))) for other in (single, per_record))
    print(f"\nmax |NLL difference| between modes: {diff:.2e} (padding and batch shape only)")


if __name__ == "__main__":
    main()
