import os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch; torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import builders as B
for name in sys.argv[1:] or list(B.BUILDERS):
    t = time.time()
    try:
        p = B.BUILDERS[name](0)
        x = B.generate(name, p, 3)
        y = B.generate(name, p, 3, **B.two_calls(name))
        print(name, "ok", tuple(x.shape), float(x.abs().max()), tuple(y.shape), round(time.time() - t, 1), flush=True)
    except Exception as e:
        import traceback; traceback.print_exc()
        print(name, "FAILED", type(e).__name__, e, flush=True)
