"""Follow-up checks for the findings of probe.py (writes extras.json).

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 .venv/bin/python results/compat/image/extras.py

1. zimage_tensor_latent: Z-Image's forward takes the latent as a *list* of tensors, so bcc's
   capture cannot name the latent input and the "reads the latent" filter of the default selector
   is off. Wrapping the model so that its first argument is one stacked tensor shows what the
   default selector picks once the latent is known.
2. inductor_baseline: plain torch.compile (no bcc) vs eager on the models whose bcc inductor
   all-True error was ~1e-6 (sana, zimage), to tell inductor's own rounding from bcc's.
3. sana_flops: the share of the FLOPs in the modules the default selector picks (attn2) vs the
   whole SanaTransformerBlock (what caching could save).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import probe  # noqa: E402

HERE = Path(__file__).resolve().parent


class ZImageTensorLatent(torch.nn.Module):
    """Z-Image called with one (B, C, 1, H, W) latent tensor first, as pipelines hold it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latents, t, cap_feats, return_dict=False):
        return self.model(list(latents.unbind(0)), t, cap_feats, return_dict=return_dict)


def zimage_tensor_latent():
    import bcc
    from bcc.analyze.blocks import module_calls
    from bcc.capture.graph import LATENT, capture
    m, inputs, _, _ = probe.build("zimage")
    (xs, t, caps), kw = inputs(0)
    w = ZImageTensorLatent(m).eval()
    args = (torch.stack(xs), t, caps)
    with torch.no_grad():
        w(*args)          # eager warm-up: Z-Image's RopeEmbedder caches freqs lazily (see zimage_cold)
    names = bcc.find_blocks(w, (args, {}))
    gm = capture(w, args, {}).gm
    calls = module_calls(gm)
    return {"default_blocks_with_tensor_latent": names, "latent_placeholder": gm.meta.get(LATENT),
            "reads_latent": {n: calls[n].reads_latent for n in ("model.noise_refiner.0", "model.context_refiner.0",
                                                               "model.layers.0")}}


def zimage_cold():
    """Z-Image's RopeEmbedder (a plain object on the model) fills ``self.freqs_cis`` lazily at the first
    call. If that first call is bcc's torch.export capture, FakeTensors are left there."""
    import bcc
    from bcc import Schedule
    ref, inputs, _, _ = probe.build("zimage")
    plain = probe.run_steps(ref, inputs)
    out = {}
    # a) compile only (no find_blocks), cold: the compiled graph vs plain, then the user's model
    m, _, _, _ = probe.build("zimage")
    fast = bcc.compile(m, Schedule(torch.ones(probe.T, 2, dtype=torch.bool), ["layers.0", "layers.1"]),
                       backend="eager")
    out["a_compiled_vs_plain"] = probe.compare(probe.run_steps(fast, inputs), plain)["max_rel_err"]
    out["a_freqs_cis_type_after"] = type(m.rope_embedder.freqs_cis[0]).__name__
    out["a_plain_model_after_vs_plain"] = probe.compare(probe.run_steps(m, inputs), plain)["max_rel_err"]
    # b) same compiled model, next trajectory with another prompt length (a new signature: recapture)
    g = torch.Generator().manual_seed(5)
    caps2 = [torch.randn(5, 32, generator=g), torch.randn(4, 32, generator=g)]

    def other_prompt(fm):
        with torch.no_grad():
            for s in range(probe.T):
                (xs, t, _caps), kw = inputs(s)
                fm(xs, t, caps2, **kw)
    try:
        other_prompt(fast)
        out["b_second_prompt_length"] = "ok"
    except Exception as e:  # noqa: BLE001
        out["b_second_prompt_length"] = probe.error_record("b", e)
    # c) workaround: one eager call before bcc
    m, _, _, _ = probe.build("zimage")
    a, kw = inputs(0)
    with torch.no_grad():
        m(*a, **kw)
    bcc.find_blocks(m, (a, kw))
    fast = bcc.compile(m, Schedule(torch.ones(probe.T, 2, dtype=torch.bool), ["layers.0", "layers.1"]),
                       backend="eager")
    out["c_warm_compiled_vs_plain"] = probe.compare(probe.run_steps(fast, inputs), plain)["max_rel_err"]
    other_prompt(fast)
    out["c_warm_second_prompt_length"] = "ok"
    out["c_warm_signatures"] = fast.bcc_stats()["signatures"]
    out["c_plain_model_after_vs_plain"] = probe.compare(probe.run_steps(m, inputs), plain)["max_rel_err"]
    return out


def inductor_baseline(name):
    m, inputs, _, _ = probe.build(name)
    plain = probe.run_steps(m, inputs)
    comp = torch.compile(m, fullgraph=False)
    outs = probe.run_steps(comp, inputs)
    return probe.compare(outs, plain)


def sana_flops():
    from torch.utils.flop_counter import FlopCounterMode
    m, inputs, _, _ = probe.build("sana")
    a, kw = inputs(0)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(*a, **kw)
    per = fc.get_flop_counts()
    tot = sum(per["Global"].values())

    def f(path):
        key = next((k for k in per if k.endswith(path)), None)
        return sum(per[key].values()) if key else None
    out = {"total": tot}
    for p in ("transformer_blocks.0", "transformer_blocks.0.attn1", "transformer_blocks.0.attn2",
              "transformer_blocks.0.ff"):
        out[p] = f(p)
    out["attn2_share_of_model"] = 2 * out["transformer_blocks.0.attn2"] / tot
    out["blocks_share_of_model"] = 2 * out["transformer_blocks.0"] / tot
    return out


def main():
    res = {}
    for key, fn in [("zimage_cold", zimage_cold), ("zimage_tensor_latent", zimage_tensor_latent), ("sana_flops", sana_flops),
                    ("inductor_baseline_sana", lambda: inductor_baseline("sana")),
                    ("inductor_baseline_zimage", lambda: inductor_baseline("zimage"))]:
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(key, json.dumps(res[key], default=str)[:800], flush=True)
        torch._dynamo.reset()
    (HERE / "extras.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
