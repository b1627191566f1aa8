"""Where does a MEMIT edit go on a post-MLP-norm model (Gemma 3)? One or a few requests:

1. p(new) with the optimised z injected at the last edited layer (bare prompt, fact token);
2. per edited layer: the wanted change of the residual (after the post-MLP norm, at the bare prompt's fact
   token) against what the layer's delta realises there; and at layer L the share of z − h realised.

    KEDIT_CACHE=/tmp/kc python bench/diag_postnorm.py --model gemma3-270m --layers 4,5,6,7,8 -n 3
"""
from __future__ import annotations

import argparse
import json

import torch

import kedit_core as kedit
from kedit_core.adapters.base import BoundAdapter
from kedit_core.deltas import temporarily_applied
from kedit_core.editing.positions import encode_prompts
from kedit_core.requests import EditRequest, load_requests
from kedit_core.tracing import TraceDict, primary


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--layers", default="4,5,6,7,8")
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--toyota", action="store_true")
    p.add_argument("--lam", type=float, default=2000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(1)
    layers = [int(x) for x in a.layers.split(",")]
    model = kedit.load_model(a.model, device="cpu")
    ad = model.adapter
    if a.toyota:
        requests = [EditRequest("{} was founded in the country of", "Toyota", " Germany", " Japan")]
    else:
        requests = list(load_requests("/work/shared/data/counterfact_dev.json", limit=a.n))
    from kedit_core.demo import DEMO_CORPUS
    from kedit_core.stats import CachedCovariance
    ctx = kedit.EditContext(seed=0, progress=False, stats=CachedCovariance(DEMO_CORPUS, None, tokens=3000, progress=False))

    recorded = []
    orig = BoundAdapter.mlp_output_change

    def spy(self, layer, m, r):
        out = orig(self, layer, m, r)
        recorded.append((layer, m.detach().clone(), r.detach().clone(), out.detach().clone()))
        return out
    BoundAdapter.mlp_output_change = spy
    extra = {}
    for s in a.set:
        k, v = s.split("=", 1)
        extra[k] = json.loads(v)
    res = kedit.compute_edit(model, requests, "memit", context=ctx, layers=layers, mom2_update_weight=a.lam,
                             v_num_grad_steps=a.steps, **extra)
    BoundAdapter.mlp_output_change = orig
    print("value steps", res.info["value_steps"], "final loss", [round(x, 3) for x in res.info["value_final_loss"]])

    enc = encode_prompts(model.tokenizer, [r.prompt for r in requests], [r.subject for r in requests],
                         fact_token="subject_last", rule="offsets")
    L = layers[-1]
    post = [ad.post_mlp_norm_name(l) for l in layers]
    names = [ad.layer_name(L)] + [x for x in post if x] + [ad.mlp_name(l) for l in layers]

    def measure(deltas, inject=None):
        outs = []
        for i, (r, e) in enumerate(zip(requests, enc)):
            ids = torch.tensor([e.ids])

            def edit(output, layer):
                if inject is None or layer != ad.layer_name(L):
                    return output
                h = primary(output).clone()
                h[0, e.index] = inject[i]
                from kedit_core.tracing import replace_primary
                return replace_primary(output, h)
            with torch.no_grad(), temporarily_applied(model.model, deltas), \
                    TraceDict(model.model, names, retain_output=True, edit_output=edit) as td:
                logits = model.model(input_ids=ids).logits[0, -1]
            tgt = model.tokenizer(r.target_new, add_special_tokens=False)["input_ids"][0]
            tru = model.tokenizer(r.target_true, add_special_tokens=False)["input_ids"][0]
            pr = logits.softmax(-1)
            outs.append({"acts": {n: primary(td[n].output)[0, e.index].double() for n in names},
                         "p_new": float(pr[tgt]), "p_true": float(pr[tru]), "top": model.tokenizer.decode(int(pr.argmax()))})
        return outs

    z = res.info.get("_z")
    deltas = dict(res.deltas.tensors) if hasattr(res.deltas, "tensors") else dict(res.deltas.items())
    base = measure({})
    # z is not returned; rebuild it from the first-layer record: error_0 = (z − H_0) with H_0 = base h_L
    n = len(requests)
    first = [rec for rec in recorded if rec[0] == layers[0]][0]
    # residual r = error / |R| for layer 0 -> z = h + |R| r mapped back? r is post-divide; recorded r is pre-map
    zs = torch.stack([base[i]["acts"][ad.layer_name(L)] for i in range(n)]) + len(layers) * first[2]
    inj = measure({}, inject=zs.float())
    for i in range(n):
        print(f"[{i}] {requests[i].subject!r} -> {requests[i].target_new!r}: base p_new {base[i]['p_new']:.3f} "
              f"p_true {base[i]['p_true']:.3f} top {base[i]['top']!r}; with z injected p_new {inj[i]['p_new']:.3f} "
              f"top {inj[i]['top']!r}; |h_L| {base[i]['acts'][ad.layer_name(L)].norm():.1f} |z-h| {(zs[i]-base[i]['acts'][ad.layer_name(L)]).norm():.1f}")
    applied = {}
    prev = base
    for j, l in enumerate(layers):
        wname = ad.mlp_out_weight_name(l)
        applied[wname] = deltas[wname]
        now = measure(applied)
        rec = [x for x in recorded if x[0] == l][0]
        _, m, r, change = rec
        norm = ad.module(post[j]) if post[j] else None
        for i in range(n):
            pn = post[j] or ad.mlp_name(l)
            realised = now[i]["acts"][pn] - prev[i]["acts"][pn]
            wanted = r[i].double()
            # what the mapped change would realise if made exactly
            if norm is not None:
                with torch.no_grad():
                    ideal = norm(m[i:i+1].float() + change[i:i+1].float()).double()[0] - norm(m[i:i+1].float()).double()[0]
                dm_real = now[i]["acts"][ad.mlp_name(l)] - prev[i]["acts"][ad.mlp_name(l)]
                dm_frac = float(dm_real @ change[i].double() / change[i].double().norm() ** 2)
            else:
                ideal = wanted
                dm_frac = float("nan")
            frac = lambda x: float(x @ wanted / wanted.norm() ** 2)  # noqa: E731
            print(f"L{l} [{i}] |wanted| {wanted.norm():.2f} |post-norm out| {prev[i]['acts'][pn].norm():.2f} "
                  f"|m| {m[i].norm():.2f} |Δm wanted| {change[i].norm():.2f}  Δm realised/wanted {dm_frac:.3f}  "
                  f"ideal-map frac {frac(ideal):.3f} cos {torch.cosine_similarity(ideal, wanted, 0):.3f}  "
                  f"realised frac {frac(realised):.3f} cos {torch.cosine_similarity(realised, wanted, 0):.3f}")
        prev = now
    final = prev
    for i in range(n):
        want = zs[i] - base[i]["acts"][ad.layer_name(L)]
        got = final[i]["acts"][ad.layer_name(L)] - base[i]["acts"][ad.layer_name(L)]
        print(f"[{i}] at layer {L}: realised share of z-h {float(got @ want / want.norm()**2):.3f} "
              f"cos {torch.cosine_similarity(got, want, 0):.3f}; after edit p_new {final[i]['p_new']:.3f} top {final[i]['top']!r}")


if __name__ == "__main__":
    main()
