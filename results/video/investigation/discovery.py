"""Block discovery: bcc's default rule vs the proposed one, on every model (issue-18 + bcc zoo).

Proposed rule (bcc/analyze/blocks.py, the ATTENTION selector): the outermost modules that contain
attention and no spatial convolution **and read the latent** — some node of the module depends on
the denoiser's latent input (the first tensor leaf of the call: sample / hidden_states). Embedding and
conditioning modules (Mochi's time_embed with its attention pooling, HunyuanVideo's context_embedder
token refiner, Lumina2's context_refiner) see only timestep / text / masks.

python discovery.py [names...]   (FIXES=... applies fixes first, e.g. hidream_dense_moe)
"""
import os
import sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.fx as fx
import bcc, models, fixes
from bcc.analyze import blocks as B
from bcc.capture.graph import capture

fixes.apply()


def latent_dependent(gm: fx.GraphModule, latent_index: int = 0) -> set:
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seen, todo = set(), [ph[latent_index]]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def proposed_selector(gm, latent_index=0):
    calls = B.module_calls(gm)
    dep = latent_dependent(gm, latent_index)
    reads = {p: any(n in dep for n in c.nodes) for p, c in calls.items()}
    return lambda path, cls: calls[path].has_attention and not calls[path].has_spatial_conv and reads[path]


def summary(blocks):
    out = {}
    for b in blocks:
        c = b.class_name.rsplit(".", 1)[-1]
        out[c] = out.get(c, 0) + 1
    return ", ".join(f"{v}x {k}" for k, v in out.items())


ZOO = ["zoo:unet-tiny", "zoo:pixart", "zoo:sd3", "zoo:flux", "zoo:dit", "zoo:sdxl-small"]
names = sys.argv[1:] or ZOO + ["wan", "hunyuan", "svd", "hidream", "hidream-dense", "lumina2", "mochi"]
for name in names:
    try:
        m, a, k = models.build(name)
        gm = capture(m, a, k).gm
    except Exception as e:
        print(f"{name:16s} capture fails ({type(e).__name__}); rule not applicable")
        continue
    old = B.find_block_regions(gm, B.ATTENTION)
    new = B.find_block_regions(gm, proposed_selector(gm))
    same = [b.name for b in old] == [b.name for b in new]
    print(f"{name:16s} default: {len(old):2d} [{summary(old)}]")
    if not same:
        print(f"{'':16s} proposed: {len(new):2d} [{summary(new)}]  dropped {sorted({b.name for b in old} - {b.name for b in new})}"
              f" added {sorted({b.name for b in new} - {b.name for b in old})}")
    else:
        print(f"{'':16s} proposed: unchanged")
    sys.stdout.flush()
