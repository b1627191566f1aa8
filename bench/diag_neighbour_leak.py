"""Why do CounterFact neighbours break on one model and not another? A MEMIT/AlphaEdit batch's deltas
measured at the edited facts' subject tokens and at their neighbourhood prompts (other subjects, same
relation, same true object):

1. per edited layer, that layer's delta alone: the linear response ``|ΔW k|`` at every token and what it
   realises in the residual stream (the block's MLP contribution after any post-MLP norm, against the
   residual's norm there) — at the edited prompts' subject token and at the neighbours' tokens;
2. all deltas: the shift of ``log p(new) - log p(true)`` at the neighbours' prediction token, and which
   neighbours flip (true no longer above new).

Reads a sequential session's batch (``--session DIR --batch 1``: its requests and deltas) and the
CounterFact file for the neighbourhood prompts; writes JSON (``--out``)::

    KEDIT_CACHE=/tmp/kc python bench/diag_neighbour_leak.py --model gemma3-270m \\
        --session /tmp/seqwork_gemma/memit --data ../shared/data/counterfact_dev.json --out leak.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file

import kedit_core as kedit
from kedit_core.atomic import write_json_atomic
from kedit_core.deltas import temporarily_applied
from kedit_core.editing.positions import encode_prompts
from kedit_core.tracing import TraceDict, primary


def _quantiles(values) -> dict:
    v = sorted(float(x) for x in values)
    if not v:
        return {}
    q = lambda p: v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"median": q(0.5), "p90": q(0.9), "max": v[-1], "mean": statistics.fmean(v), "n": len(v)}


def _target_id(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--session", required=True, help="a sequential session directory (batches/NNNN/)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--data", required=True, help="the CounterFact file the requests came from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    batch_dir = Path(a.session) / "batches" / f"{a.batch:04d}"
    requests = json.loads((batch_dir / "requests.json").read_text())
    deltas = load_file(str(batch_dir / "deltas.safetensors"))
    records = {r["case_id"]: r for r in json.loads(Path(a.data).read_text())}
    model = kedit.load_model(a.model, device="cpu")
    ad, tok, net = model.adapter, model.tokenizer, model.model
    layer_of = {}
    for name in deltas:
        for layer in range(ad.num_layers):
            if ad.mlp_out_weight_name(layer) == name:
                layer_of[name] = layer
    layers = sorted(layer_of.values())
    down = {l: ad.mlp_out_weight_name(l).rsplit(".", 1)[0] for l in layers}
    # What the block adds to the residual: the post-MLP norm's output where the model has one (Gemma), else
    # the down projection's output.
    contrib = {l: ad.post_mlp_norm_name(l) or down[l] for l in layers}
    resid = {l: ad.layer_name(l) for l in layers}
    names = sorted(set(down.values()) | set(contrib.values()) | set(resid.values()))

    # Prompts: each edited fact's rewrite prompt (read at its subject's last token) and its neighbours
    # (read at every token; the prediction is at the last).
    enc = encode_prompts(tok, [r["prompt"] for r in requests], [r["subject"] for r in requests])
    edited = [(e.ids, e.index) for e in enc]
    neighbours, owner = [], []
    for i, r in enumerate(requests):
        for text in records[r["case_id"]]["neighborhood_prompts"]:
            neighbours.append(tok(text, add_special_tokens=True)["input_ids"])
            owner.append(i)
    e_ids, e_pos = [ids for ids, _ in edited], [pos for _, pos in edited]
    n_pos = [-1] * len(neighbours)
    new_id = [_target_id(tok, r["target_new"]) for r in requests]
    true_id = [_target_id(tok, r["target_true"]) for r in requests]

    wanted = sorted(set(new_id) | set(true_id))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def run(prompts, positions, applied, keep_keys=False, batch_size=64):
        """Per prompt, at its position: traced activations of every name and the keys (every token's when
        ``keep_keys``); and the last token's log-probabilities. Right-padded batches (causal: the padding
        never reaches a real token)."""
        out = []
        with torch.no_grad(), temporarily_applied(net, applied), \
                TraceDict(net, names, retain_input=keep_keys, retain_output=True) as td:
            for s in range(0, len(prompts), batch_size):
                chunk = prompts[s:s + batch_size]
                width = max(len(ids) for ids in chunk)
                ids = torch.tensor([list(x) + [pad] * (width - len(x)) for x in chunk])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
                logits = net(input_ids=ids, attention_mask=mask).logits
                for j, x in enumerate(chunk):
                    pos = positions[s + j] % len(x)
                    out.append({"acts": {n: primary(td[n].output)[j, pos].double() for n in names},
                                "keys": {l: td[down[l]].input[j, :len(x)].double() for l in layers} if keep_keys else None,
                                "pos": pos, "logp": dict(zip(wanted, logits[j, len(x) - 1].double().log_softmax(-1)[wanted].tolist()))})
        return out

    base_e, base_n = run(e_ids, e_pos, {}, keep_keys=True), run(neighbours, n_pos, {}, keep_keys=True)
    per_layer = {}
    for l in layers:
        name = ad.mlp_out_weight_name(l)
        dw = ad.from_param_layout(deltas[name]).double()          # [d_out, d_in]
        only = {name: deltas[name]}
        now_e, now_n = run(e_ids, e_pos, only), run(neighbours, n_pos, only)

        def realised(before, after):
            """|Δ contribution| / |residual| at each prompt's position."""
            return [float((a_["acts"][contrib[l]] - b["acts"][contrib[l]]).norm() / b["acts"][resid[l]].norm())
                    for b, a_ in zip(before, after)]

        lin_e = [float((dw @ b["keys"][l][b["pos"]]).norm()) for b in base_e]
        rel_e = [float((dw @ b["keys"][l][b["pos"]]).norm() / b["acts"][down[l]].norm()) for b in base_e]
        lin_last = [float((dw @ b["keys"][l][-1]).norm()) for b in base_n]
        lin_max = [float((dw @ b["keys"][l].T).norm(dim=0).max()) for b in base_n]
        rel_last = [float((dw @ b["keys"][l][-1]).norm() / b["acts"][down[l]].norm()) for b in base_n]
        med_e = statistics.median(lin_e)
        per_layer[str(l)] = {
            "edited_subject_token": {
                "linear_response": _quantiles(lin_e),
                "response_over_mlp_output": _quantiles(rel_e),
                "realised_over_residual": _quantiles(realised(base_e, now_e)),
            },
            "neighbour_last_token": {
                "linear_response_over_edited_median": _quantiles(x / med_e for x in lin_last),
                "response_over_mlp_output": _quantiles(rel_last),
                "realised_over_residual": _quantiles(realised(base_n, now_n)),
            },
            "neighbour_any_token": {
                "linear_response_over_edited_median": _quantiles(x / med_e for x in lin_max),
            },
        }
        print(f"layer {l}: edited |ΔWk| median {med_e:.3g}, realised/|h| "
              f"{per_layer[str(l)]['edited_subject_token']['realised_over_residual']['median']:.3g}; neighbours' last "
              f"token |ΔWk|/edited {per_layer[str(l)]['neighbour_last_token']['linear_response_over_edited_median']['median']:.3g}"
              f" (max over tokens {per_layer[str(l)]['neighbour_any_token']['linear_response_over_edited_median']['median']:.3g}),"
              f" realised/|h| {per_layer[str(l)]['neighbour_last_token']['realised_over_residual']['median']:.3g}", flush=True)

    def margin(measured, i):
        """log p(true) - log p(new) of request i's objects (first tokens) at the prompt's last token."""
        return measured["logp"][true_id[i]] - measured["logp"][new_id[i]]

    all_n, all_e = run(neighbours, n_pos, deltas), run(e_ids, e_pos, deltas)
    edited_shift = [margin(b, i) - margin(a_, i) for i, (b, a_) in enumerate(zip(base_e, all_e))]
    shifts, flips, held = [], 0, 0
    for b, a_, i in zip(base_n, all_n, owner):
        margin_b, margin_a = margin(b, i), margin(a_, i)
        shifts.append(margin_b - margin_a)
        if margin_b > 0:
            held += 1
            flips += margin_a <= 0
    result = {
        "model": a.model, "session": str(a.session), "batch": a.batch, "edits": len(requests),
        "neighbour_prompts": len(neighbours), "layers": layers,
        "per_layer_alone": per_layer,
        "all_layers": {
            "edited_margin_shift_true_minus_new_logp": _quantiles(edited_shift),
            "neighbour_margin_shift_true_minus_new_logp": _quantiles(shifts),
            "neighbours_true_above_new_before": held,
            "of_those_flipped_after": flips,
        },
    }
    write_json_atomic(a.out, result, indent=1)
    print(json.dumps(result["all_layers"]))


if __name__ == "__main__":
    main()
