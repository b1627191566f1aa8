"""The GE and RS text statistics before and after they moved onto NLTK and scikit-learn: kedit's earlier
hand-written tokenizer and TF-IDF (read from git at the commit before the change) against the current
ones, on WikiText paragraphs cut to generation length (the reference generates 100 tokens per prompt).

    python bench/text_metrics_audit.py [--out bench/results/text_metrics_audit.json]

Prints and writes: mean GE x100 both ways, per-text |ΔGE|, how many texts tokenise identically, the
kinds of token difference, the TF-IDF vocabulary and idf agreement, and |ΔRS| over random text pairs.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "4b4d59d"   # the last commit with the hand-written tokenizer and TF-IDF
WIKITEXT = REPO / "tests" / "fixtures" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def old_module():
    """The earlier ``text_metrics`` module, written from git to a temporary file and imported from there."""
    import importlib.util
    import tempfile

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:kedit_core/evaluation/text_metrics.py"],
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_text_metrics.py"
    path.write_text(source.replace("from ..errors import", "from kedit_core.errors import"), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("old_text_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "text_metrics_audit.json")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from kedit_core.evaluation import text_metrics as new

    old = old_module()
    lines = [line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines()]
    texts = [" ".join(line.split()[:100]) for line in lines if len(line) > 200]
    ge_old = [old.ngram_entropy(t) for t in texts]
    ge_new = [new.ngram_entropy(t) for t in texts]
    diffs = [abs(a - b) for a, b in zip(ge_old, ge_new)]
    kinds: collections.Counter = collections.Counter()
    same = 0
    for t in texts:
        a, b = old.word_tokenize(t), new.word_tokenize(t)
        same += a == b
        for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
            if op != "equal":
                kinds[f"{' '.join(a[i1:i2])} -> {' '.join(b[j1:j2])}"] += 1
    corpus = [line for line in lines if line]
    tfidf_old, tfidf_new = old.TfidfModel.fit(corpus), new.TfidfModel.fit(corpus)
    rng = random.Random(args.seed)
    pairs = [(rng.choice(texts), rng.choice(texts)) for _ in range(args.pairs)]
    rs = [abs(tfidf_old.similarity(a, b) - tfidf_new.similarity(a, b)) for a, b in pairs]
    result = {
        "texts": len(texts), "source": str(WIKITEXT.relative_to(REPO)), "before_commit": BEFORE, "seed": args.seed,
        "ge_x100": {"mean_before": 100 * statistics.mean(ge_old), "mean_after": 100 * statistics.mean(ge_new),
                    "per_text_abs_diff_mean": 100 * statistics.mean(diffs), "per_text_abs_diff_max": 100 * max(diffs),
                    "texts_tokenised_identically": same},
        "token_differences_most_common": kinds.most_common(12),
        "tfidf": {"documents": len(corpus), "vocabulary_before": len(tfidf_old.idf),
                  "vocabulary_after": len(tfidf_new.idf), "same_vocabulary": set(tfidf_old.idf) == set(tfidf_new.idf),
                  "idf_max_abs_diff": max(abs(tfidf_old.idf[k] - tfidf_new.idf[k]) for k in tfidf_old.idf)},
        "rs_x100": {"pairs": len(pairs), "abs_diff_max": 100 * max(rs), "abs_diff_mean": 100 * statistics.mean(rs)},
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
