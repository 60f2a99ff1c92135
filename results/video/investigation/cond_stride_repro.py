"""Plain-torch repro: a torch.cond operand that is conv -> flatten -> transpose -> contiguous.

    python cond_stride_repro.py [plain|patch|config:<name>=<value>|opaque]

plain:   inductor compiles the branch for the operand's traced (contiguous) strides, but lays the
         operand out in the conv output's order (it reuses the dead conv buffer): stride assertion.
patch:   Conditional.create requires the operands' exact traced strides (the fix in fixes.py).
opaque:  the operand passes through an op inductor cannot re-layout (fixes.py fixed_layout op).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 16, 2, stride=2)
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, pred, x):
        h = self.conv(x).flatten(2).transpose(1, 2).contiguous()       # (B, N, C), contiguous
        if MODE.startswith("opaque"):
            import fixes
            h = fixes.fixed_layout(h)
        return torch.cond(pred, lambda h: self.lin(h) + 1, lambda h: h * 2, (h,))


MODE = sys.argv[1] if len(sys.argv) > 1 else "plain"
if __name__ == "__main__":
    import fixes

    opts = {}
    if "+nolayout" in MODE:  # bcc's DEFAULT_INDUCTOR_OPTIONS
        opts["layout_optimization"] = False
    if MODE.startswith("patch"):
        fixes.fix_cond_operand_strides()
    if MODE.startswith("config:"):
        k, v = MODE[len("config:"):].split("=")
        opts[k] = eval(v)
    m = M().eval()
    x = torch.randn(2, 4, 8, 8)
    ref = m(torch.tensor(True), x)
    try:
        with torch.no_grad():
            out = torch.compile(m, backend="inductor", fullgraph=True, options=opts)(torch.tensor(True), x)
        print(MODE, "ok", float((out - ref).abs().max()))
    except Exception as e:
        while e.__cause__ or e.__context__:
            e = e.__cause__ or e.__context__
        print(MODE, "FAIL", type(e).__name__, str(e).splitlines()[0])
