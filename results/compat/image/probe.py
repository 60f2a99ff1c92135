"""Probe bcc on newer diffusers image transformers (diffusers 0.42.1, random weights, tiny configs).

    OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 .venv/bin/python results/compat/image/probe.py [model ...]
    .venv/bin/python results/compat/image/probe.py --merge      # runs/*.json -> results.json

Models: qwen flux2 chroma sana cogview4 zimage auraflow (default: all, in one process).
Each model's record is written to runs/<model>.json as soon as it is done (full tracebacks
to runs/<model>.log); --merge collects them into results.json.

Stages per model (4 steps, batch 2, decreasing timesteps, fresh latents each step, same text):
  1 plain     eager forward of the unmodified model
  2 blocks    bcc.find_blocks (default "attention" selector): names and classes
  3 eager_all bcc.compile(backend="eager"), all-True schedule, vs plain (torch.equal / max rel err)
  4 eager_rand eager, seeded random schedule (row 0 all True; step 1 reuses block 0, recomputes the
              last block) vs an independent reference written here (Ref: per-block forward wrapper,
              reuse = hidden_states_now + (out - in) from the block's last recompute, per stream)
  5 inductor  default backend: all-True vs plain, then set_schedule(random) vs eager bcc; graphs stat
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import inspect
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs"
B = 2          # batch (e.g. the two CFG halves)
T = 4          # steps
NAMES = ("qwen", "flux2", "chroma", "sana", "cogview4", "zimage", "auraflow")


def _rand(*shape, g):
    return torch.randn(*shape, generator=g)


def _sigmas(step):                       # flow-matching style, decreasing
    return 1.0 - 0.2 * step              # 1.0, 0.8, 0.6, 0.4


# ----------------------------------------------------------------------------- builders
# Each returns (model, inputs(step) -> (args, kwargs), expected block-name globs, output names per class).

def _qwen():
    from diffusers import QwenImageTransformer2DModel
    m = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 6, 32, g=cg)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0                       # second prompt is shorter (padding), as a batch of prompts gives

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 16, 16, g=g)         # packed latents: 8x8 latent, 4 ch, 2x2 patches -> 4x4 tokens of 16
        t = torch.full((B,), 1000.0 * _sigmas(step))
        return (), dict(hidden_states=x, timestep=t / 1000, guidance=None, encoder_hidden_states_mask=mask,
                        encoder_hidden_states=txt, img_shapes=[[(1, 4, 4)]] * B, attention_kwargs=None,
                        return_dict=False)
    return m, inputs, ["transformer_blocks.*"], {"QwenImageTransformerBlock": ("encoder_hidden_states", "hidden_states")}


def _flux2():
    from diffusers import Flux2Transformer2DModel
    m = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 6, 32, g=cg)
    # pipeline: _prepare_text_ids (T,H,W,L) = (0,0,0,l); _prepare_latent_ids (0,h,w,0)
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(6))
    txt_ids = txt_ids.unsqueeze(0).repeat(B, 1, 1)
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1))
    img_ids = img_ids.unsqueeze(0).repeat(B, 1, 1)
    guidance = torch.full([1], 4.0).expand(B)

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 16, 16, g=g)         # (B, image_seq_len, C): 4x4 tokens of 16 channels
        t = torch.full((B,), 1000.0 * _sigmas(step))
        return (), dict(hidden_states=x, timestep=t / 1000, guidance=guidance, encoder_hidden_states=txt,
                        txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs=None, return_dict=False)
    return m, inputs, ["transformer_blocks.*", "single_transformer_blocks.*"], {
        "Flux2TransformerBlock": ("encoder_hidden_states", "hidden_states")}


def _chroma():
    from diffusers import ChromaTransformer2DModel
    m = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 6, 32, g=cg)
    # pipeline: text mask float (all but the first padding token masked), then cat with bool ones for the image
    seq_lengths = torch.tensor([6, 3])
    tmask = (torch.arange(6).unsqueeze(0).expand(B, -1) <= seq_lengths.unsqueeze(1)).to(torch.float32)
    attn_mask = torch.cat([tmask, torch.ones(B, 16, dtype=torch.bool)], dim=1)
    txt_ids = torch.zeros(6, 3)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] = torch.arange(4)[:, None]
    ids[..., 2] = torch.arange(4)[None, :]
    img_ids = ids.reshape(16, 3)

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 16, 16, g=g)
        t = torch.full((B,), 1000.0 * _sigmas(step))
        return (), dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=txt, txt_ids=txt_ids,
                        img_ids=img_ids, attention_mask=attn_mask, joint_attention_kwargs=None, return_dict=False)
    return m, inputs, ["transformer_blocks.*", "single_transformer_blocks.*"], {
        "ChromaTransformerBlock": ("encoder_hidden_states", "hidden_states")}


def _sana():
    from diffusers import SanaTransformer2DModel
    m = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
        mlp_ratio=2.5, sample_size=8, patch_size=1)
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 6, 32, g=cg)
    mask = torch.ones(B, 6, dtype=torch.long)
    mask[1, 4:] = 0

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 4, 8, 8, g=g)
        t = torch.full((B,), 1000.0 * _sigmas(step)) * m.config.timestep_scale
        return (x,), dict(encoder_hidden_states=txt, encoder_attention_mask=mask, timestep=t, return_dict=False,
                          attention_kwargs=None)
    return m, inputs, ["transformer_blocks.*"], {}


def _cogview4():
    from diffusers import CogView4Transformer2DModel
    m = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=32, condition_dim=16, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(8, 8))
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 8, 32, g=cg)
    size = torch.tensor([[64.0, 64.0]]).repeat(B, 1)
    crop = torch.tensor([[0.0, 0.0]]).repeat(B, 1)

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 4, 8, 8, g=g)
        t = torch.full((B,), 1000.0 * _sigmas(step))   # pipeline passes scheduler timesteps (0..1000)
        return (), dict(hidden_states=x, encoder_hidden_states=txt, timestep=t, original_size=size,
                        target_size=size, crop_coords=crop, attention_kwargs=None, return_dict=False)
    return m, inputs, ["transformer_blocks.*"], {"CogView4TransformerBlock": ("hidden_states", "encoder_hidden_states")}


def _zimage():
    from diffusers import ZImageTransformer2DModel
    m = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32])
    cg = torch.Generator().manual_seed(1)
    caps = [_rand(6, 32, g=cg), _rand(4, 32, g=cg)]   # per-prompt lengths differ (list input)

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        lat = _rand(B, 4, 8, 8, g=g)
        t = torch.full((B,), 1000.0 * _sigmas(step))
        t = (1000 - t) / 1000
        xs = list(lat.unsqueeze(2).unbind(dim=0))          # list of (C, F=1, H, W)
        return (xs, t, caps), dict(joint_attention_kwargs=None, return_dict=False)
    return m, inputs, ["layers.*"], {}


def _auraflow():
    from diffusers import AuraFlowTransformer2DModel
    m = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=64)
    cg = torch.Generator().manual_seed(1)
    txt = _rand(B, 6, 32, g=cg)

    def inputs(step):
        g = torch.Generator().manual_seed(100 + step)
        x = _rand(B, 4, 8, 8, g=g)
        t = torch.tensor([1000.0 * _sigmas(step) / 1000]).expand(B)
        return (x,), dict(encoder_hidden_states=txt, timestep=t, return_dict=False, attention_kwargs=None)
    return m, inputs, ["joint_transformer_blocks.*", "single_transformer_blocks.*"], {
        "AuraFlowJointTransformerBlock": ("encoder_hidden_states", "hidden_states")}


BUILDERS = {"qwen": _qwen, "flux2": _flux2, "chroma": _chroma, "sana": _sana, "cogview4": _cogview4,
            "zimage": _zimage, "auraflow": _auraflow}
CLASSES = {"qwen": "QwenImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
           "chroma": "ChromaTransformer2DModel", "sana": "SanaTransformer2DModel",
           "cogview4": "CogView4Transformer2DModel", "zimage": "ZImageTransformer2DModel",
           "auraflow": "AuraFlowTransformer2DModel"}


def build(name):
    torch.manual_seed(0)
    m, inputs, expected, out_names = BUILDERS[name]()
    return m.eval(), inputs, expected, out_names


# ----------------------------------------------------------------------------- helpers

def leaves(out):
    return [x for x in tree_leaves(out) if isinstance(x, torch.Tensor)]


def compare(outs, refs):
    """Per step: equal?, max |a-b| / max |b| over all output leaves."""
    equal, rel = True, []
    for o, r in zip(outs, refs):
        lo, lr = leaves(o), leaves(r)
        if len(lo) != len(lr) or any(a.shape != b.shape for a, b in zip(lo, lr)):
            return {"equal": False, "structure_mismatch": True,
                    "shapes": [[list(a.shape) for a in lo], [list(b.shape) for b in lr]]}
        equal &= all(torch.equal(a, b) for a, b in zip(lo, lr))
        num = max(float((a - b).abs().max()) for a, b in zip(lo, lr))
        den = max(float(b.abs().max()) for b in lr)
        rel.append(num / max(den, 1e-30))
    return {"equal": bool(equal), "max_rel_err": max(rel), "per_step_rel_err": rel}


def error_record(stage, exc):
    import bcc
    tb = traceback.extract_tb(exc.__traceback__)
    inner_bcc = inner_torch = inner_any = None
    for fr in tb:
        loc = f"{fr.filename}:{fr.lineno} in {fr.name}"
        inner_any = loc
        if "bcc/" in fr.filename or "passes/" in fr.filename:
            inner_bcc = loc
        if "/site-packages/torch/" in fr.filename:
            inner_torch = loc
    msg = str(exc).strip().splitlines()
    rec = {"stage": stage, "type": f"{type(exc).__module__}.{type(exc).__name__}",
           "is_bcc_error": isinstance(exc, bcc.BccError),
           "is_bcc_internal": isinstance(exc, bcc.BccInternalError),
           "first_lines": msg[:6], "innermost_bcc_frame": inner_bcc, "innermost_torch_frame": inner_torch,
           "innermost_frame": inner_any}
    if isinstance(exc, bcc.BccError):
        rec["code"] = exc.code.value
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        rec["cause"] = {"type": f"{type(cause).__module__}.{type(cause).__name__}",
                        "first_lines": str(cause).strip().splitlines()[:4]}
    return rec


def random_mask(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(T, k, generator=g) < 0.5
    mask[0] = True
    mask[1, 0] = False
    mask[1, -1] = True
    if k == 1:
        mask[1, 0] = False          # one block: step 1 reuses it (first and last coincide)
    return mask


class Ref:
    """Independent block-caching reference: wraps each block's forward on the plain model.

    Recompute steps call the block and store, per output tensor, ``out - in`` where ``in`` is the
    block input of the same stream name (named by ``out_names[class]`` for tuple outputs, the first
    forward parameter for a single tensor) when the shapes match, else the whole output. Reuse
    steps return ``in_now + residual`` (or the stored whole output)."""

    def __init__(self, model, names, mask, out_names, whole=()):
        self.model, self.names, self.mask, self.step = model, list(names), mask, 0
        self.out_names, self.whole = out_names, set(whole)
        self.cache, self.kinds, self._orig = {}, {}, {}
        for k, n in enumerate(self.names):
            mod = model.get_submodule(n)
            self._orig[n] = mod
            mod.forward = self._wrap(k, n, mod, mod.forward)

    def _wrap(self, k, n, mod, orig):
        sig = inspect.signature(orig)
        params = list(sig.parameters)
        cls = type(mod).__name__

        def fwd(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            ins = bound.arguments
            recompute = self.step == 0 or bool(self.mask[self.step, k])
            if recompute:
                out = orig(*args, **kwargs)
                outs, is_tuple = (list(out), True) if isinstance(out, (tuple, list)) else ([out], False)
                onames = self.out_names.get(cls) if is_tuple else (params[0],)
                entries = []
                for i, o in enumerate(outs):
                    nm = onames[i] if onames and i < len(onames) else None
                    base = ins.get(nm) if nm else None
                    if (n not in self.whole and isinstance(o, torch.Tensor) and isinstance(base, torch.Tensor)
                            and base.shape == o.shape):
                        entries.append(("res", nm, (o - base).detach().clone()))
                    else:
                        entries.append(("whole", nm, o.detach().clone() if isinstance(o, torch.Tensor) else o))
                self.cache[n] = (entries, is_tuple, type(out))
                self.kinds[n] = [(e[0], e[1]) for e in entries]
                return out
            entries, is_tuple, typ = self.cache[n]
            res = [ins[nm] + v if kind == "res" else v for kind, nm, v in entries]
            return typ(res) if is_tuple else res[0]
        return fwd

    def run(self, inputs):
        outs = []
        for s in range(T):
            self.step = s
            a, kw = inputs(s)
            with torch.no_grad():
                outs.append(self.model(*a, **kw))
        return outs

    def remove(self):
        for n, mod in self._orig.items():
            del mod.forward


def run_steps(fn, inputs):
    outs = []
    with torch.no_grad():
        for s in range(T):
            a, kw = inputs(s)
            outs.append(fn(*a, **kw))
    return outs


def _warns(ws):
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}" for w in ws
                   if w.category.__name__ == "BccWarning"})


# ----------------------------------------------------------------------------- the probe

def probe(name, log):
    import bcc
    from bcc import Schedule
    rec = {"model": CLASSES[name], "stages": {}}
    st = rec["stages"]
    model, inputs, expected_globs, out_names = build(name)
    rec["params"] = sum(p.numel() for p in model.parameters())

    def stage(key, fn):
        t0 = time.time()
        try:
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                val = fn()
            st[key] = {"ok": True, **(val or {})}
            bw = _warns(ws)
            if bw:
                st[key]["bcc_warnings"] = bw
        except Exception as exc:  # noqa: BLE001 - the probe records everything
            st[key] = {"ok": False, "error": error_record(key, exc)}
            log.write(f"\n===== {name} / {key}\n{traceback.format_exc()}\n")
            log.flush()
        st[key]["seconds"] = round(time.time() - t0, 1)
        print(f"[{name}] {key}: {json.dumps(st[key], default=str)[:600]}", flush=True)
        return st[key]["ok"]

    ctx = {}

    # 1 plain
    def s_plain():
        ctx["plain"] = run_steps(model, inputs)
        ls = leaves(ctx["plain"][0])
        return {"output_shapes": [list(x.shape) for x in ls],
                "finite": all(bool(torch.isfinite(x).all()) for o in ctx["plain"] for x in leaves(o))}
    if not stage("1_plain", s_plain):
        return rec

    # 2 blocks
    def s_blocks():
        import fnmatch
        a, kw = inputs(0)
        found = bcc.find_blocks(model, (a, kw))
        names = [b if isinstance(b, str) else b.name for b in found]
        classes = [type(model.get_submodule(n)).__name__ for n in names]
        counts = {}
        for c in classes:
            counts[c] = counts.get(c, 0) + 1
        expected = [n for n, _ in model.named_modules() if n and any(
            fnmatch.fnmatchcase(n, g) and n.count(".") == g.count(".") for g in expected_globs)]
        ctx["names"] = names
        return {"names": names, "classes": classes, "counts": counts, "return_type": type(found[0]).__name__,
                "expected_stack": expected, "matches_stack": names == expected}
    if not stage("2_blocks", s_blocks):
        return rec
    names = ctx["names"]
    run_schedule_stages(stage, ctx, model, inputs, names, out_names, rec, prefix="")

    # 6 follow-up when the default set is not the per-layer stack: what bcc sees (module traits),
    #   and stages 3-5 again with the stack selected by glob (what a user would do next)
    if not st["2_blocks"]["matches_stack"]:
        def s_traits():
            from bcc.analyze.blocks import module_calls
            from bcc.capture.graph import LATENT, capture
            a, kw = inputs(0)
            gm = capture(model, a, kw).gm
            calls = module_calls(gm)
            keep = sorted({n for n in calls if n.count(".") <= 2 and any(
                n.split(".")[0] == g.split(".")[0] for g in expected_globs + [x.split(".")[0] for x in names])})
            return {"latent_placeholder": gm.meta.get(LATENT),
                    "traits": {n: {"class": calls[n].class_name.rsplit(".", 1)[-1],
                                   "has_attention": calls[n].has_attention,
                                   "has_spatial_conv": calls[n].has_spatial_conv,
                                   "reads_latent": calls[n].reads_latent} for n in keep}}
        stage("6_discovery_traits", s_traits)

        def s_stack_blocks():
            a, kw = inputs(0)
            found = bcc.find_blocks(model, (a, kw), blocks=expected_globs)
            ctx["stack_names"] = list(found)
            return {"selector": expected_globs, "names": list(found),
                    "classes": [type(model.get_submodule(n)).__name__ for n in found]}
        if stage("6_stack_blocks", s_stack_blocks):
            run_schedule_stages(stage, {"plain": ctx["plain"]}, model, inputs, ctx["stack_names"], out_names, rec,
                                prefix="6_stack_")

    # 7 cold start: what a user does first -- a fresh model (same weights), never called eagerly,
    #   find_blocks then compile then call; afterwards, is the user's plain model still right?
    def s_cold():
        cold, _, _, _ = build(name)
        a, kw = inputs(0)
        out = {}
        try:
            found = bcc.find_blocks(cold, (a, kw))
            out["find_blocks"] = "ok"
            fast = bcc.compile(cold, Schedule(torch.ones(T, len(found), dtype=torch.bool), list(found)),
                               backend="eager")
            out["compiled_all_true_vs_plain"] = compare(run_steps(fast, inputs), ctx["plain"])
        except Exception as exc:  # noqa: BLE001
            out["error"] = error_record("7_cold", exc)
            log.write(f"\n===== {name} / 7_cold (inner)\n{traceback.format_exc()}\n")
        def _is_fake(v):
            vals = tree_leaves(v)
            vals += [y for x in vals if not isinstance(x, torch.Tensor) and hasattr(x, "__dict__")
                     for y in tree_leaves(list(vars(x).values()))]
            return any(type(x).__name__ == "FakeTensor" for x in vals)
        fakes = [f"{mn}.{k}" for mn, mod in cold.named_modules() for k, v in vars(mod).items()
                 if not k.startswith("_") and _is_fake(v)]
        out["fake_tensors_left_on_model"] = fakes
        out["plain_model_after_vs_plain"] = compare(run_steps(cold, inputs), ctx["plain"])
        out["cold_ok"] = ("error" not in out and not fakes
                          and out["plain_model_after_vs_plain"].get("max_rel_err", 1) < 1e-6)
        return out
    stage("7_cold", s_cold)
    return rec


def run_schedule_stages(stage, ctx, model, inputs, names, out_names, rec, prefix):
    import bcc
    from bcc import Schedule
    k = len(names)
    all_true = torch.ones(T, k, dtype=torch.bool)
    rmask = random_mask(k)
    rec[prefix + "random_mask"] = rmask.int().tolist()

    # 3 eager all-True
    def s_eager_all():
        fast = bcc.compile(model, Schedule(all_true, names), backend="eager")
        outs = run_steps(fast, inputs)
        return {**compare(outs, ctx["plain"]), "graphs": fast.bcc_stats()["graphs"]}
    stage(prefix + "3_eager_all", s_eager_all)

    # 4 eager random vs own reference
    def s_eager_rand():
        ref = Ref(model, names, all_true, out_names)
        try:
            sanity = compare(ref.run(inputs), ctx["plain"])
            ref.mask = rmask
            ref.cache = {}
            ref_outs = ref.run(inputs)
            kinds = ref.kinds
        finally:
            ref.remove()
        ctx["ref_rand"] = ref_outs
        fast = bcc.compile(model, Schedule(rmask, names), backend="eager")
        outs = run_steps(fast, inputs)
        ctx["eager_rand"] = outs
        slots = [{"block": s.block, "shape": list(s.shape), "base": str(s.base)} for s in fast.bcc_slots()]
        res = {**compare(outs, ref_outs), "reference_all_true_vs_plain": sanity, "reference_cache_kinds": kinds,
               "bcc_slots": slots, "vs_plain": compare(outs, ctx["plain"])["max_rel_err"]}
        if not res["equal"] and res.get("max_rel_err", 1) > 1e-6:
            # which of the two is right? bcc caches some outputs whole (base None): rerun the
            # reference caching exactly those blocks whole, and one block at a time reused
            whole = sorted({s["block"] for s in slots if s["base"] == "None"})
            ref2 = Ref(model, names, rmask, out_names, whole=whole)
            try:
                res["reference_whole_for_" + ",".join(whole)] = compare(outs, ref2.run(inputs))
            finally:
                ref2.remove()
            per_block = {}
            for j, n in enumerate(names):       # only block j follows the random row; others recompute
                m1 = torch.ones_like(rmask)
                m1[:, j] = rmask[:, j]
                r_res, r_whole = Ref(model, names, m1, out_names), None
                try:
                    o_res = r_res.run(inputs)
                finally:
                    r_res.remove()
                r_whole = Ref(model, names, m1, out_names, whole=[n])
                try:
                    o_whole = r_whole.run(inputs)
                finally:
                    r_whole.remove()
                fb = bcc.compile(model, Schedule(m1, names), backend="eager")
                o_b = run_steps(fb, inputs)
                per_block[n] = {"bcc_vs_ref_residual": compare(o_b, o_res)["max_rel_err"],
                                "bcc_vs_ref_whole": compare(o_b, o_whole)["max_rel_err"]}
            res["per_block"] = per_block
        return res
    stage(prefix + "4_eager_rand", s_eager_rand)

    # 5 inductor
    def s_inductor():
        out = {}
        fast = bcc.compile(model, Schedule(all_true, names))
        t0 = time.time()
        outs = run_steps(fast, inputs)
        out["compile_and_run_s"] = round(time.time() - t0, 1)
        out["all_true_vs_plain"] = compare(outs, ctx["plain"])
        out["has_set_schedule"] = hasattr(fast, "set_schedule")
        fast.set_schedule(Schedule(rmask, names))
        outs_r = run_steps(fast, inputs)
        if "eager_rand" in ctx:
            out["rand_vs_eager_bcc"] = compare(outs_r, ctx["eager_rand"])
        if "ref_rand" in ctx:
            out["rand_vs_reference"] = compare(outs_r, ctx["ref_rand"])["max_rel_err"]
        out["stats"] = fast.bcc_stats()
        out["graphs"] = out["stats"]["graphs"]
        return out
    stage(prefix + "5_inductor", s_inductor)


def merge():
    res = {}
    for n in NAMES:
        p = RUNS / f"{n}.json"
        if p.exists():
            res[n] = json.loads(p.read_text())
    (HERE / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(f"merged {list(res)} -> {HERE / 'results.json'}")


def main(argv):
    if argv and argv[0] == "--merge":
        return merge()
    names = argv or list(NAMES)
    RUNS.mkdir(parents=True, exist_ok=True)
    import torch._dynamo  # noqa: F401
    for n in names:
        with open(RUNS / f"{n}.log", "w") as log:
            t0 = time.time()
            try:
                rec = probe(n, log)
            except Exception as exc:  # noqa: BLE001 - a builder bug
                rec = {"model": CLASSES.get(n, n), "probe_error": error_record("build", exc)}
                log.write(traceback.format_exc())
            rec["seconds"] = round(time.time() - t0, 1)
        (RUNS / f"{n}.json").write_text(json.dumps(rec, indent=1, default=str))
        torch._dynamo.reset()
    merge()


if __name__ == "__main__":
    main(sys.argv[1:])
