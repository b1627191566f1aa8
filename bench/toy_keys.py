"""How many directions do a toy model's subject keys span? (Why MEMIT's edits leak on the toy world.)

For every subject of a toy checkpoint's world, reads the MLP keys (the input of each layer's MLP output
projection, what MEMIT/ROME edit against) at the subject's last token of ``"{subject} was born in"``, and
reports per layer: the participation ratio of the centred keys' spectrum (``(Σλ)² / Σλ²``, the effective
number of directions), how many directions hold 90% of the variance, and the median |cosine| between two
subjects' centred keys. MEMIT can only write N edits without moving other subjects if the keys offer
well over N independent directions.

With ``--leakage`` it also measures how much of a MEMIT-style update reaches the subjects it was not
meant for: for N edited subjects with random unit residuals R, ``Δ = R Keᵀ (λ C0 + Ke Keᵀ)⁻¹`` (C0 the
model's normalised key moment over the world's statistics corpus, as MEMIT uses), and it reports
``‖Δ k‖`` averaged over the edited subjects (what is written) and over all the others (what leaks). The
same is measured on random-feature keys (``GELU(W x)``, x a layer-normalised Gaussian, W Gaussian) of
several MLP widths, which tells whether the trained model's keys are worse than random ones of its width
or whether the width itself is the limit.

    python bench/toy_keys.py                       # the committed toy model
    python bench/toy_keys.py --leakage --out bench/results/toy_keys/toy_3_facts.json
    python bench/toy_keys.py --model DIR --out bench/results/toy_keys_other.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


@torch.no_grad()
def subject_keys(model, world, layers) -> dict[int, torch.Tensor]:
    """Every subject's MLP key (float64, ``[subjects, d_k]``) at its last token of ``"{subject} was born in"``,
    per layer of ``layers``, from one forward stopped after the deepest one."""
    from kedit_core.tracing import TraceDict

    tok, subjects, layers = model.tokenizer, list(world.subjects), list(layers)
    last = torch.tensor([len(tok(s, add_special_tokens=False)["input_ids"]) - 1 for s in subjects])
    names = [model.adapter.mlp_out_name(layer) for layer in layers]
    batch = tok([f"{s} was born in" for s in subjects], return_tensors="pt", padding=True)
    with TraceDict(model.model, names, retain_input=True, stop_after=names[-1]) as td:
        model.model(**batch)
    return {layer: td[name].input[torch.arange(len(subjects)), last].double() for layer, name in zip(layers, names)}


def key_spectrum(model, world) -> list[dict]:
    rows = []
    for layer, keys in subject_keys(model, world, range(model.adapter.num_layers)).items():
        centred = keys - keys.mean(0)
        power = torch.linalg.svdvals(centred) ** 2
        unit = torch.nn.functional.normalize(centred, dim=1)
        cos = (unit @ unit.T).abs()
        off = ~torch.eye(keys.shape[0], dtype=torch.bool)
        rows.append({"layer": layer, "key_size": keys.shape[1], "subjects": keys.shape[0],
                     "participation_ratio": float(power.sum() ** 2 / (power ** 2).sum()),
                     "dims_for_90pct_variance": int((power.cumsum(0) / power.sum() < 0.9).sum()) + 1,
                     "median_abs_cosine_centred": float(cos[off].median())})
    return rows


def update_leakage(keys: torch.Tensor, c0: torch.Tensor, num_edits: int, lam: float, seed: int = 0,
                   residual_size: int = 64) -> dict:
    """Write random unit residuals into ``num_edits`` of ``keys`` (rows) with MEMIT's closed form and
    measure ``‖Δ k‖`` on the edited rows (written) and on every other row (leaked)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(keys.shape[0], generator=g)
    edited, others = keys[perm[:num_edits]], keys[perm[num_edits:]]
    r = torch.nn.functional.normalize(torch.randn(residual_size, num_edits, generator=g, dtype=keys.dtype), dim=0)
    ke = edited.T
    delta = torch.linalg.solve(lam * c0 + ke @ ke.T, ke @ r.T).T     # R Keᵀ (λC0 + Ke Keᵀ)⁻¹ (symmetric)
    written = (delta @ ke).norm(dim=0)
    return {"edits": num_edits, "lambda": lam, "written": float(written.mean()),
            "missed": float((delta @ ke - r).norm(dim=0).mean()),
            "leaked": float((delta @ others.T).norm(dim=0).mean())}


def random_feature_keys(d_model: int, d_ff: int, count: int, seed: int = 0) -> torch.Tensor:
    """Keys of an untrained GELU MLP on layer-normalised Gaussian inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, d_model, generator=g, dtype=torch.float64)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    w = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64) / d_model ** 0.5
    return torch.nn.functional.gelu(x @ w)


def leakage_table(model, world, layers, edit_counts, lambdas, widths, seed: int = 0) -> dict:
    from kedit_core.toyworld.editing import toy_statistics

    stats = toy_statistics(world, False)
    stats.prepare(model, list(layers))
    trained = []
    for layer, keys in subject_keys(model, world, layers).items():
        c0 = stats.moment(model, layer).mom2.double()
        for n in edit_counts:
            for lam in lambdas:
                trained.append({"layer": layer, **update_leakage(keys, c0, n, lam, seed)})
    subjects, d_model = len(world.subjects), model.adapter.hidden_size
    random = []
    for d_ff in widths:
        # C0 from many more inputs than subjects, as a corpus gives (and so that C0 is invertible).
        keys = random_feature_keys(d_model, d_ff, subjects + 6000, seed)
        c0 = keys.T @ keys / keys.shape[0]
        for n in edit_counts:
            for lam in lambdas:
                random.append({"d_model": d_model, "d_ff": d_ff, **update_leakage(keys[:subjects], c0, n, lam, seed)})
    return {"seed": seed, "trained": trained, "random_features": random}


def main(argv=None) -> int:
    import kedit_core as kedit
    from kedit_core.toyworld import checkpoint_dir, checkpoint_metadata, load_world

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="toy checkpoint directory (default: the committed one)")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    parser.add_argument("--leakage", action="store_true", help="also measure how MEMIT-style updates leak")
    parser.add_argument("--edits", default="10,100,200", help="edit counts for --leakage")
    parser.add_argument("--lambdas", default="30,100,1000", help="λ values for --leakage")
    parser.add_argument("--widths", default="512,1024,2048,4096", help="random-feature MLP widths for --leakage")
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
    leakage = None
    if args.leakage:
        ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
        leakage = leakage_table(model, world, range(model.adapter.num_layers), ints(args.edits),
                                [float(x) for x in args.lambdas.split(",")], ints(args.widths))
        print("MEMIT-style update with random unit residuals: mean ||Δk|| on edited subjects / on all others")
        for r in leakage["trained"]:
            print(f"  trained layer {r['layer']}, {r['edits']:4d} edits, λ {r['lambda']:6g}: written "
                  f"{r['written']:.3f}, leaked {r['leaked']:.3f}")
        for r in leakage["random_features"]:
            print(f"  random GELU keys d_ff {r['d_ff']:5d}, {r['edits']:4d} edits, λ {r['lambda']:6g}: written "
                  f"{r['written']:.3f}, leaked {r['leaked']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = {"model": str(args.model or "toy"), "world": meta["world"], "train": meta["train"], "layers": rows}
        if leakage is not None:
            result["leakage"] = leakage
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
