"""Layer-level first signal on SmolLM2-135M: layer L's attention cut by its removal path (o_proj refitted
to the dense attention output on 8x512 C4 calibration), then the value refit (solvers/values.py); the exact
attention-output error on the calibration tokens and on held-out C4 / WikiText-2 validation windows
(the same layer, dense inputs there), seconds and workspace.

    python benchmarks/value_refit_layers.py LAYERS PER_GROUP ITERATIONS:DAMP,... [OUT.json]

e.g. ``8,15 2 1:0.01,4:0.1,4:1.0``: layers 8 and 15 cut to 2 query heads per KV group (6 of 9),
each variant refitted from the same cut. Not the protocol: a layer-level signal (docs/experiments.md)."""
import copy
import json
import sys

import torch
from structprune import PruneConfig, load_model
from structprune.data import get_calibration
from structprune.data.calibration import get_heldout_calibration
from structprune.engine import capture_first_layer_inputs, collect_stats, run_layer
from structprune.adapters import get_adapter
from structprune.engine.activations import ActivationStore
from structprune.solvers import values
from structprune.solvers.modules import attention_path, cut_attention, heads_of_path

torch.set_num_threads(1)
LAYERS = [int(x) for x in sys.argv[1].split(",")]
STEP = sys.argv[2] if len(sys.argv) > 2 else "2"
VARIANTS = [tuple(float(x) if "." in x else int(x) for x in v.split(":")) for v in sys.argv[3].split(",")]  # per_group kept: "2" (6 of 9 heads) or "1" (3 of 9)
model, tok = load_model("smollm2-135m")
adapter = get_adapter(model)
cpu = torch.device("cpu")
sets = {"calib": get_calibration(tok, "c4", 8, 512, seed=0),
        "c4_heldout": get_heldout_calibration(tok, "c4", 4, 512),
        "wt2_valid": get_heldout_calibration(tok, "wikitext2", 4, 512)}
inputs = {k: capture_first_layer_inputs(model, adapter, v, cpu, batch_size=1) for k, v in sets.items()}
cfg = PruneConfig()
layers = adapter.layers()
out = []

def attn_io(layer, inp):
    o = adapter.attn_linears(layer)[1]
    ys = ActivationStore()
    h = o.register_forward_hook(lambda m, a, y: ys.append(y.detach().clone()))
    try:
        nxt = run_layer(layer, inp, cpu)
    finally:
        h.remove()
    return ys, nxt

def err(layer, inp, ys):
    got, nxt = attn_io(layer, inp)
    nxt.close()
    return sum(float((t.double() - y.double()).pow(2).sum()) for t, y in zip(ys, got))

for i in range(max(LAYERS) + 1):
    layer = layers[i]
    targets, nexts = {}, {}
    for k, inp in inputs.items():
        targets[k], nexts[k] = attn_io(layer, inp)
    if i in LAYERS:
        work = copy.deepcopy(layer)
        st = collect_stats(adapter, work, inputs["calib"], cpu, modules=("attn",))["attn"]
        path = attention_path(adapter, work, st, cfg, target=(3, int(STEP)))
        heads, groups = heads_of_path(path, len(path.steps))
        cut_attention(adapter, work, st, heads, groups, cfg)
        before = {k: err(work, inputs[k], targets[k]) for k in inputs}
        for iters, damp in VARIANTS:
            w2 = copy.deepcopy(work)
            r = values.refit_values(adapter, w2, inputs["calib"], lambda c: targets["calib"][c], cpu, iters, True, damp)
            after = {k: err(w2, inputs[k], targets[k]) for k in inputs}
            row = {"layer": i, "iterations": iters, "damp": damp, "heads": heads, "kv_heads": groups, "before": before,
                   "after": after, "ratio": {k: after[k] / before[k] for k in before}, "log": r}
            out.append(row)
            print(json.dumps({"layer": i, "iterations": iters, "damp": damp, "kept_heads": len(heads),
                              "ratio": row["ratio"], "adopted": r["adopted"],
                              "seconds": round(r["seconds"], 2), "passes": r["passes"],
                              "workspace_MiB": round(r["workspace_bytes"] / 2**20, 1)}), flush=True)
    for k in inputs:
        targets[k].close()
        inputs[k] = nexts[k]  # the dense trajectory
if len(sys.argv) > 4:
    json.dump(out, open(sys.argv[4], "w"), indent=1)
