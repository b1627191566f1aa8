"""Causal tracing's pack budget on CPU: one SmolLM2 fact traced with the old packing (every row of a pack
computed from the pack's lowest block; ``row_join=False``) at 512 tokens, and with rows joining at their
own block at 2048 and 512 tokens. Prints and writes forward passes and seconds.

    python bench/trace_pack_budget.py FACT_INDEX THREADS OUT.json   # FACT_INDEX into known_1000.json
"""
import time, sys, os, json, torch
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
from kedit_core.models import load_model
from kedit_core.causal_trace import TraceSettings, load_facts, trace_fact
import kedit_core.causal_trace.engine as eng
m = load_model("smollm2-135m", dtype="float32", device="cpu")
facts = {f.index: f for f in load_facts("/work/shared/data/known_1000.json")}
fact = facts[int(sys.argv[1])]
orig_init = eng.FactTracer.__init__
rows = []
for rep in range(1):
    for label, mt, join in [("old-512", 512, False), ("new-2048", 2048, True), ("new-512", 512, True)]:
        def init(self, *a, _join=join, **k):
            orig_init(self, *a, **k); self.row_join = _join
        eng.FactTracer.__init__ = init
        t = time.perf_counter(); r = trace_fact(m, fact, TraceSettings(max_tokens=mt), 0.3494)
        s = time.perf_counter() - t
        rows.append(dict(rep=rep, label=label, forwards=r["forwards"], seconds=round(s, 1), tokens=len(r["tokens"]), load=os.getloadavg()[0]))
        print(rows[-1], flush=True)
json.dump({"what": "one SmolLM2 fact (known_1000 index %s) traced: 3 kinds, 30 layers, 10 samples; old packing (rows computed from the pack's lowest block) vs rows joining at their own block, per pack budget" % sys.argv[1], "torch_threads": torch.get_num_threads(), "command": "python " + " ".join(sys.argv), "rows": rows}, open(sys.argv[3], "w"), indent=1)
