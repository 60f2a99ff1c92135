"""Monkeypatches of bcc that prove the recommended fixes (the repo is not edited).

    import fixes; fixes.apply("passthrough")        # or "passthrough,alias_clone,..." ; see FIXES

Each fix is a function that patches one bcc function in place.
"""
from __future__ import annotations

import os

import torch
import torch.fx as fx

aten = torch.ops.aten


# --- fix 1: pass-throughs of a block input are not block outputs ---------------------------------
def _same_tensor(node: fx.Node, src: fx.Node) -> bool:
    """``node`` is ``src`` itself: a non-mutating op that returned its input (``x.float()`` on fp32,
    ``contiguous()`` of a contiguous tensor, ``type_as`` of the same dtype, ``alias``).

    make_fx (torch.export) then rebinds the Python tensor to ``node``, so every later reader of that
    tensor, inside or outside the block, reads ``node``."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target._schema.is_mutable:
        return False  # copy_, add_, ...: a mutation is not a pass-through
    v, s = node.meta.get("val"), src.meta.get("val")
    if not (isinstance(v, torch.Tensor) and isinstance(s, torch.Tensor)):
        return False
    try:
        same_storage = v.untyped_storage()._cdata == s.untyped_storage()._cdata
    except Exception:
        return False
    return (same_storage and v.shape == s.shape and v.stride() == s.stride()
            and v.storage_offset() == s.storage_offset() and v.dtype == s.dtype)


def reroute_pass_throughs(gm: fx.GraphModule, meta_key: str = "bcc_block") -> list[tuple[str, str, str]]:
    """For every node of a block that is (a chain of) identities of a value from outside that block,
    point the readers outside the block at that value. Returns (block, node, source) triples."""
    done = []
    for node in list(gm.graph.nodes):
        block = node.meta.get(meta_key)
        if block is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src = node
        while (isinstance(src.args[0] if src.args else None, fx.Node) and src.meta.get(meta_key) == block
               and _same_tensor(src, src.args[0])):
            src = src.args[0]
        if src is node or src.meta.get(meta_key) == block:
            continue  # not an identity, or an identity of a value computed inside the block
        outside = [u for u in node.users if u.meta.get(meta_key) != block]
        for u in outside:
            u.replace_input_with(node, src)
        if outside:
            done.append((block, node.name, src.name))
    return done


def fix_passthrough():
    from bcc.passes import outline_blocks

    orig = outline_blocks.OutlineBlocksPass.call
    if getattr(orig, "_video_fix", False):
        return

    def call(self, gm):
        rerouted = reroute_pass_throughs(gm, outline_blocks.META)
        if rerouted and os.environ.get("FIX_VERBOSE"):
            print("  [fix passthrough] rerouted", rerouted)
        return orig(self, gm)

    call._video_fix = True
    outline_blocks.OutlineBlocksPass.call = call


FIXES = {"passthrough": fix_passthrough}


def apply(spec: str | None = None) -> None:
    spec = spec if spec is not None else os.environ.get("FIXES", "")
    for name in filter(None, spec.split(",")):
        FIXES[name]()


# --- fix 2: cond operands get the exact strides their branches were compiled for ---------------
def fix_cond_operand_strides():
    """Inductor's Conditional.create realizes each operand with whatever layout its producer's
    FlexibleLayout settles on (a clone of a transposed view may be laid out in the view's order and
    written into the dead producer's buffer), but lowers both branch subgraphs for the operands'
    traced strides (meta["val"]) and asserts them at entry. Require the traced strides first,
    as Conditional.create already does for the branch outputs."""
    from torch._inductor import ir

    orig = ir.Conditional.create.__func__
    if getattr(orig, "_video_fix", False):
        return

    def create(cls, predicate, true_fn, false_fn, operands):
        from torch._inductor.virtualized import V

        fx_operands = V.graph.current_node.args[-1]
        fixed = []
        for x, fx_op in zip(operands, fx_operands):
            val = fx_op.meta.get("val") if isinstance(fx_op, fx.Node) else None
            if isinstance(val, torch.Tensor) and isinstance(x, ir.IRNode) and val.layout == torch.strided:
                x = ir.ExternKernel.require_exact_strides(x, val.stride(), allow_padding=False)
            fixed.append(x)
        return orig(cls, predicate, true_fn, false_fn, fixed)

    create._video_fix = True
    ir.Conditional.create = classmethod(create)


# --- alternative to fix 2 without touching inductor: an op inductor cannot re-layout ------------
_LIB = None


def _define_fixed_layout():
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("bccvideo", "DEF")
    _LIB.define("fixed_layout(Tensor x) -> Tensor", tags=(torch.Tag.needs_exact_strides,))

    def impl(x):
        return x.clone(memory_format=torch.contiguous_format)

    _LIB.impl("fixed_layout", impl, "CompositeExplicitAutograd")
    _LIB._register_fake("fixed_layout", lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))


def fixed_layout(x):
    _define_fixed_layout()
    return torch.ops.bccvideo.fixed_layout(x)


FIXES["cond_strides"] = fix_cond_operand_strides


def fix_opaque_operands():
    """Alternative to cond_strides inside bcc only: GateBlocksPass routes every cond operand through
    bccvideo::fixed_layout (tagged needs_exact_strides), whose output inductor allocates with the
    traced (contiguous) strides instead of re-laying it out."""
    from bcc.passes import gate_blocks

    orig = gate_blocks._contiguous
    if getattr(orig, "_video_fix", False):
        return
    _define_fixed_layout()

    def _contiguous(g, node, like=None):
        if like is None:  # GateBlocksPass.call: a cond operand
            return g.call_function(torch.ops.bccvideo.fixed_layout.default, (node,))
        return orig(g, node, like)

    _contiguous._video_fix = True
    gate_blocks._contiguous = _contiguous


FIXES["opaque_operands"] = fix_opaque_operands


# --- fix 3 (backend path): tensor constants stay outside the branches ---------------------------
def fix_const_operands():
    """find_block_regions pulls every get_attr used only by a block into the block, so it ends up in
    a cond branch's submodule. For a parameter that is fine; for a tensor *constant* that export
    lifted (``lifted_tensor_0``, from ``mask[..., 0] = True`` in HunyuanVideo's token refiner)
    compile_fx (backend path, no Dynamo retrace) functionalizes the branch around a constant it never
    lifted: "Attempting to use FunctionalTensor on its own". Keep non-parameter, non-buffer get_attrs
    out of the region: they become cond operands, which compile_fx lifts like any constant."""
    from bcc.analyze import blocks

    orig = blocks._with_private_params
    if getattr(orig, "_video_fix", False):
        return

    def _with_private_params(nodes):
        region = orig(nodes)
        for n in list(region):
            if n.op == "get_attr":
                gm = n.graph.owning_module
                owned = dict(gm.named_parameters(remove_duplicate=False))
                owned.update(dict(gm.named_buffers(remove_duplicate=False)))
                if n.target not in owned:
                    region.discard(n)
        return region

    _with_private_params._video_fix = True
    blocks._with_private_params = _with_private_params


FIXES["const_operands"] = fix_const_operands


def fix_lift_fresh():
    """Backend path: Dynamo turns ``mask[..., 0] = True`` into a tensor constant; the re-export keeps
    ``lift_fresh_copy(get_attr lifted_tensor_0)`` inside the block. Inside a cond branch that
    constant is an operand, which AOT functionalization wraps, and ``lift_fresh_copy`` refuses a
    FunctionalTensor ("Attempting to use FunctionalTensor on its own"). lift_fresh_copy of a fresh
    constant is a copy: rewrite it to ``aten.clone`` before outlining."""
    from bcc.passes import outline_blocks

    orig = outline_blocks.OutlineBlocksPass.call

    def call(self, gm):
        for n in gm.graph.nodes:
            if n.target is aten.lift_fresh_copy.default and n.meta.get(outline_blocks.META) is not None:
                n.target = aten.clone.default
        gm.recompile()
        return orig(self, gm)

    outline_blocks.OutlineBlocksPass.call = call


FIXES["lift_fresh"] = fix_lift_fresh


def fix_const_buffers():
    """Backend path: compile_fx (called directly, no Dynamo retrace) lifts the parameters and *buffers*
    of the rewritten module into graph inputs, but a plain tensor attribute (export's
    ``lifted_tensor_0``) inside a cond branch stays a real constant, which the branch's
    functionalization then meets ("Attempting to use FunctionalTensor on its own"). Register every
    get_attr tensor constant as a (non-persistent) buffer of the root before outlining."""
    from bcc.passes import outline_blocks

    orig = outline_blocks.OutlineBlocksPass.call

    def call(self, gm):
        owned = {k for k, _ in gm.named_parameters(remove_duplicate=False)}
        owned |= {k for k, _ in gm.named_buffers(remove_duplicate=False)}
        k = 0
        for n in gm.graph.nodes:
            if n.op != "get_attr" or n.target in owned:
                continue
            owner, _, attr = n.target.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            t = getattr(mod, attr, None)
            if isinstance(t, torch.Tensor):
                name = f"bcc_const_{k}"
                k += 1
                gm.register_buffer(name, t, persistent=False)
                n.target = name
        gm.recompile()
        return orig(self, gm)

    outline_blocks.OutlineBlocksPass.call = call


FIXES["const_buffers"] = fix_const_buffers


def fix_scalar_consts():
    """Backend path, HunyuanVideo token refiner: ``lift_fresh_copy(get_attr lifted_tensor_0)`` of a
    0-d constant inside a block becomes ``aten.full([], value)``: no tensor constant inside a branch."""
    from bcc.passes import outline_blocks

    orig = outline_blocks.OutlineBlocksPass.call

    def call(self, gm):
        for n in list(gm.graph.nodes):
            if n.target is aten.lift_fresh_copy.default and n.meta.get(outline_blocks.META) is not None:
                src = n.args[0]
                if src.op != "get_attr":
                    continue
                owner, _, attr = src.target.rpartition(".")
                t = getattr(gm.get_submodule(owner) if owner else gm, attr)
                if t.dim() == 0:
                    with gm.graph.inserting_before(n):
                        full = gm.graph.call_function(aten.full.default, ([], t.item()), {"dtype": t.dtype, "device": t.device})
                    full.meta.update(n.meta)
                    n.replace_all_uses_with(full)
                    gm.graph.erase_node(n)
                    if not src.users:
                        gm.graph.erase_node(src)
        gm.recompile()
        return orig(self, gm)

    outline_blocks.OutlineBlocksPass.call = call


FIXES["scalar_consts"] = fix_scalar_consts


# --- fix 5 (HiDream dense): export leaves slice(x, d, None, <unbacked>) that inductor cannot codegen -
def fold_slice_none(gm: fx.GraphModule) -> int:
    """``x[i, : pH * pW]`` with ``pH, pW`` read from a tensor (HiDream's ``unpatchify``) exports as
    ``aten.slice.Tensor(x, 0, None, u1)`` with ``u1 = item(...)`` unbacked. Inductor lowers it to a
    DynamicSliceSize whose codegen does ``Max(0, Min(start, size))`` on start=None: "The argument
    'None' is not comparable". Spell the default out: start None -> 0 (end None -> sys.maxsize)."""
    import sys as _sys
    k = 0
    for n in gm.graph.nodes:
        if n.target is aten.slice.Tensor:
            args = list(n.args) + [0, None, None, 1][len(n.args) - 1:]
            if len(args) >= 4 and (args[2] is None or args[3] is None):
                args[2] = 0 if args[2] is None else args[2]
                args[3] = _sys.maxsize if args[3] is None else args[3]
                n.args = tuple(args[:5] if len(args) > 4 else args)
                k += 1
    gm.recompile()
    return k


def fix_slice_none():
    import bcc.capture.graph as graph

    orig = graph.capture
    if getattr(orig, "_video_fix", False):
        return

    def capture(*a, **k):
        c = orig(*a, **k)
        fold_slice_none(c.gm)
        return c

    capture._video_fix = True
    graph.capture = capture
    import bcc.api, bcc.lower.backend, bcc.runtime.module  # they import capture by name
    for mod in (bcc.api, bcc.lower.backend, bcc.runtime.module):
        mod.capture = capture


FIXES["slice_none"] = fix_slice_none


# --- model-side workaround (not bcc): HiDream's MoE in a static-shape dense form ----------------
def hidream_dense_moe():
    """Replace MOEFeedForwardSwiGLU.forward's token routing (bincount().cpu().numpy(), a loop over
    data-dependent token counts) by running every expert on every token and weighting with the gate's
    top-k weights scattered to a [tokens, experts] table. Same result up to float summation order;
    num_experts / num_activated times the expert FLOPs; one static graph."""
    from diffusers.models.transformers import transformer_hidream_image as h

    def forward(self, x):
        wtype = x.dtype
        orig_shape = x.shape
        topk_idx, topk_weight, _ = self.gate(x)
        flat = x.view(-1, x.shape[-1])
        weights = torch.zeros(flat.shape[0], len(self.experts), dtype=topk_weight.dtype, device=x.device)
        weights = weights.scatter_add(1, topk_idx.view(flat.shape[0], -1), topk_weight.view(flat.shape[0], -1))
        y = sum(expert(flat).to(wtype) * weights[:, i:i + 1].to(wtype) for i, expert in enumerate(self.experts))
        return y.view(*orig_shape) + self.shared_experts(x)

    h.MOEFeedForwardSwiGLU.forward = forward


FIXES["hidream_dense_moe"] = hidream_dense_moe


# --- fix 6: a capture error that names the data-dependent construct, its module and the next step --
_DATA_DEPENDENT = (
    "GuardOnDataDependentSymNode", "DataDependentOutputException", "DynamicOutputShapeException",
    "unhashable type: non-nested SymInt", ".numpy() is not supported for tensor subclasses",
    "Could not extract specialized integer from data-dependent expression",
    "Could not guard on data-dependent expression",
)


def explain_capture_failure(model: torch.nn.Module, err: BaseException) -> str | None:
    """For a data-dependent failure: '<Class> at <module path> (<file>:<line> `<source>`)'."""
    import linecache
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(x).__name__}: {x}" for x in chain)
    if not any(k in text for k in _DATA_DEPENDENT):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    where, module = None, None
    for exc in chain:
        tb = exc.__traceback__
        while tb is not None:
            f = tb.tb_frame
            fn = f.f_code.co_filename
            if "/torch/" not in fn and "/bcc/" not in fn and "/_pytest/" not in fn:
                where = (fn, tb.tb_lineno, f.f_code.co_name)
                s = f.f_locals.get("self")
                if isinstance(s, torch.nn.Module) and id(s) in names:
                    module = (names[id(s)] or "<root>", type(s).__name__)
            tb = tb.tb_next
        if where:
            break
    if where is None:
        return None
    fn, line, func = where
    src = linecache.getline(fn, line).strip()
    short = fn.split("site-packages/")[-1]
    mod = f"{module[1]} at {module[0]!r}" if module else "the model"
    return f"{mod}, {short}:{line} in {func}: `{src}`"


def fix_capture_message():
    import bcc.capture.graph as graph
    from bcc.errors import BccError, ErrorCode

    orig = graph.capture
    if getattr(orig, "_video_msg", False):
        return

    def capture(model, args, kwargs=None):
        try:
            return orig(model, args, kwargs)
        except BccError as e:
            cause = e.__cause__
            where = explain_capture_failure(model, cause) if cause is not None else None
            if where is None:
                raise
            first = next((l for l in str(cause).splitlines() if l.strip()), "")[:160]
            raise BccError(
                ErrorCode.CAPTURE_FAILED,
                f"torch.export could not capture {type(model).__name__}: its forward depends on tensor "
                f"*values* in {where} ({type(cause).__name__}: {first}). bcc needs one static graph per "
                "input shape, and neither torch.export (strict or not, capture_scalar_outputs on or off) "
                "nor Dynamo with fullgraph=True can trace value-dependent shapes or control flow. Make that "
                "code shape-static (e.g. a dense form of the routing, or lengths fixed by the input shapes), "
                "or select blocks inside it that export on their own.",
            ) from cause

    capture._video_msg = True
    graph.capture = capture
    import bcc.api, bcc.lower.backend, bcc.runtime.module
    for mod in (bcc.api, bcc.lower.backend, bcc.runtime.module):
        mod.capture = capture


FIXES["capture_message"] = fix_capture_message


# --- fix 7: default discovery takes only blocks that read the latent ------------------------------
def _latent_placeholder(gm):
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # bcc.compile: the first tensor leaf of the call. backend="bcc": Dynamo lifts parameters and
    # buffers to inputs named l_self_...; the first other input is the first user argument.
    return next((n for n in ph if not n.name.lower().startswith("l_self_")), ph[0] if ph else None)


def latent_reading_modules(gm) -> set[str]:
    from bcc.analyze import blocks as B
    start = _latent_placeholder(gm)
    dep, todo = set(), [start] if start is not None else []
    while todo:
        n = todo.pop()
        if n not in dep:
            dep.add(n)
            todo.extend(n.users)
    return {p for p, c in B.module_calls(gm).items() if any(n in dep for n in c.nodes)}


def fix_latent_rule():
    from bcc.analyze import blocks as B
    from bcc.passes import annotate_blocks

    orig = B.find_block_regions
    if getattr(orig, "_video_fix", False):
        return

    def find_block_regions(gm, selector=B.ATTENTION):
        if isinstance(selector, str) and selector == B.ATTENTION:
            calls = B.module_calls(gm)
            reads = latent_reading_modules(gm)
            sel = lambda path, cls: (calls[path].has_attention and not calls[path].has_spatial_conv  # noqa: E731
                                     and path in reads)
            try:
                return orig(gm, sel)
            except Exception:
                raise
        return orig(gm, selector)

    find_block_regions._video_fix = True
    B.find_block_regions = find_block_regions
    annotate_blocks.find_block_regions = find_block_regions


FIXES["latent_rule"] = fix_latent_rule
