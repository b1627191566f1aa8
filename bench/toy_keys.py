"""How many directions do a toy model's subject keys span? (Why MEMIT's edits leak on the toy world.)

For every subject of a toy checkpoint's world, reads the MLP keys (the input of each layer's MLP output
projection, what MEMIT/ROME edit against) at the subject's last token of ``"{subject} was born in"``, and
reports per layer: the participation ratio of the centred keys' spectrum (``(Σλ)² / Σλ²``, the effective
number of directions), how many directions hold 90% of the variance, and the median |cosine| between two
subjects' centred keys. MEMIT can only write N edits without moving other subjects if the keys offer
well over N independent directions.

    python bench/toy_keys.py                       # the committed toy model
    python bench/toy_keys.py --model DIR --out bench/results/toy_keys_other.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.no_grad()
def key_spectrum(model, world) -> list[dict]:
    from kedit_core.tracing import TraceDict

    adapter, tok = model.adapter, model.tokenizer
    subjects = list(world.subjects)
    prompts = [f"{s} was born in" for s in subjects]
    last = torch.tensor([len(tok(s, add_special_tokens=False)["input_ids"]) - 1 for s in subjects])
    names = [adapter.mlp_out_name(layer) for layer in range(adapter.num_layers)]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with TraceDict(model.model, names, retain_input=True) as td:
        model.model(**batch)
    rows = []
    for layer, name in enumerate(names):
        keys = td[name].input[torch.arange(len(subjects)), last].double()
        centred = keys - keys.mean(0)
        power = torch.linalg.svdvals(centred) ** 2
        unit = torch.nn.functional.normalize(centred, dim=1)
        cos = (unit @ unit.T).abs()
        off = ~torch.eye(len(subjects), dtype=torch.bool)
        rows.append({"layer": layer, "key_size": keys.shape[1], "subjects": len(subjects),
                     "participation_ratio": float(power.sum() ** 2 / (power ** 2).sum()),
                     "dims_for_90pct_variance": int((power.cumsum(0) / power.sum() < 0.9).sum()) + 1,
                     "median_abs_cosine_centred": float(cos[off].median())})
    return rows


def main(argv=None) -> int:
    import kedit_core as kedit
    from kedit_core.toyworld import checkpoint_dir, checkpoint_metadata, load_world

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="toy checkpoint directory (default: the committed one)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    model_dir = args.model or checkpoint_dir()
    model = kedit.load_model(model_dir, device="cpu", dtype=torch.float32)
    world = load_world(model_dir)
    rows = key_spectrum(model, world)
    meta = checkpoint_metadata(model_dir)
    print(f"{model_dir}: {len(world.subjects)} subjects, {len(world.facts)} facts, "
          f"{meta['train']['num_layers']} layers")
    for r in rows:
        print(f"  layer {r['layer']}: participation ratio {r['participation_ratio']:5.1f} of {r['key_size']}; "
              f"90% of the variance in {r['dims_for_90pct_variance']} directions; median |cos| "
              f"{r['median_abs_cosine_centred']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model or "toy"), "world": meta["world"],
                                        "train": meta["train"], "layers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
