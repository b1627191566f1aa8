"""A copy of a toy checkpoint whose MLPs are wider but compute exactly the same function.

Each MLP gets ``width - d_ff`` new hidden units with random input weights (Gaussian, the trained input
weights' standard deviation, zero bias) and zero output weights, so every logit is unchanged (checked
before saving) and the model recalls the same facts. What changes is what an editor sees: MEMIT/ROME
write against the MLP keys, and the new units add random GELU features of the same residual stream,
so a subject's key has more directions of its own. This isolates the question the toy world's MEMIT
recall bar raises (``bench/toy_keys.py --leakage``): does MEMIT leak into other subjects because the
toy MLPs are narrow?

    python bench/toy_widen.py --width 4096 --out /tmp/toy_w4096
    python bench/toy_sweep.py --model /tmp/toy_w4096 --memit '[[[0,1],100]]' --rome '[]'
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch


def widen_gpt2(model, width: int, seed: int = 0):
    """A GPT-2 model like ``model`` with ``n_inner = width`` whose outputs are identical."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if config.model_type != "gpt2":
        raise SystemExit(f"only GPT-2 toy models can be widened (this one is {config.model_type!r})")
    old = config.n_inner or 4 * config.n_embd
    if width <= old:
        raise SystemExit(f"--width {width} must exceed the model's d_ff {old}")
    wide_config = config.__class__(**{**config.to_dict(), "n_inner": width})
    wide = AutoModelForCausalLM.from_config(wide_config)
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    new_state = {}
    for name, target in wide.state_dict().items():
        source = state[name]
        extra = width - old
        if source.shape == target.shape:
            new_state[name] = source.clone()
        elif name.endswith("mlp.c_fc.weight"):      # Conv1D: [d, d_ff]
            new_state[name] = torch.cat([source, torch.randn(source.shape[0], extra, generator=g) * source.std()], 1)
        elif name.endswith("mlp.c_fc.bias"):
            new_state[name] = torch.cat([source, torch.zeros(extra)])
        elif name.endswith("mlp.c_proj.weight"):    # [d_ff, d]: the new units write nothing
            new_state[name] = torch.cat([source, torch.zeros(extra, source.shape[1])], 0)
        else:
            raise SystemExit(f"unexpected parameter shape change: {name}")
    wide.load_state_dict(new_state)
    return wide.eval()


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from kedit_core.toyworld import checkpoint_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="toy checkpoint directory (default: the committed one)")
    parser.add_argument("--width", type=int, required=True, help="new MLP hidden size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new units' input weights")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    source = Path(args.model or checkpoint_dir())
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    wide = widen_gpt2(model, args.width, args.seed)
    ids = torch.arange(3, 3 + 64).reshape(4, 16) % model.config.vocab_size
    with torch.no_grad():
        diff = float((wide(ids).logits - model(ids).logits).abs().max())
    if diff != 0.0:
        raise SystemExit(f"the widened model's logits differ by {diff}")
    args.out.mkdir(parents=True, exist_ok=True)
    wide.save_pretrained(args.out)
    for f in source.iterdir():
        if f.is_file() and not (args.out / f.name).exists():
            shutil.copy(f, args.out / f.name)
    meta_path = args.out / "toyworld.json"
    meta = json.loads(meta_path.read_text())
    meta["widened"] = {"from": str(source), "d_ff": args.width, "seed": args.seed,
                       "parameters": sum(p.numel() for p in wide.parameters())}
    meta["info"]["parameters"] = meta["widened"]["parameters"]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{args.out}: d_ff {model.config.n_inner or 4 * model.config.n_embd} -> {args.width}, identical logits, "
          f"{meta['widened']['parameters']:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
