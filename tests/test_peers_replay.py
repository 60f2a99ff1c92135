"""bcc at a peer's own decisions (bcc.tools.bench.peers_bench.replay_peers): the peer's trace
says what it computed step by step, and bcc replays exactly that as a schedule."""
import torch

import bcc
from bcc.tools.bench.peers import PeerSetting, enable
from bcc.tools.bench.peers_bench import compiled_over_eager, replay_peers
from bcc.tools.bench.workloads import build_workload


def test_replay_runs_what_the_peer_computed():
    w = build_workload("digits-dit", steps=6, n=2)
    with enable(w.model, PeerSetting("fbc", "FBC t=0.4", {"threshold": 0.4}), w.scheduler) as den:
        w.run(den)
        units, calls = den.unit_trace()
        stats = den.stats()
    assert len(calls) == 6 and [c.step for c in calls] == list(range(6))
    # Written here from the trace, apart from the bench's own reading of it.
    mask = [[n > 0 for n in c.ran] for c in calls]
    assert sum(map(sum, mask)) == stats.unit_forwards_executed < stats.unit_forwards_full  # it skipped
    assert all(mask[0]) and units[0].startswith("transformer_blocks.")
    rows = [{"label": "fbc", "trace": {"units": list(units), "mask": mask}},
            {"label": "nowhere", "trace": {"units": ["no_such.module"], "mask": [[True]] * 6}}]
    model = bcc.compile(w.model, bcc.Schedule(torch.tensor(mask), units), backend="eager")
    out = replay_peers(w, w.model, rows, repeats=1, compiled={tuple(units): model}, log=lambda msg: None)
    fbc = out["fbc"]
    assert fbc["units"] == len(units) and fbc["compute_steps"] == 6 and fbc["speedup"] > 0
    assert 0 < fbc["psnr_db"] < 100  # reused, so not identical to the plain model
    assert out["nowhere"]["error"].startswith("[BCC")


def test_eager_speedups_are_put_on_the_compiled_scale_by_one_rule():
    same_phase = {"eager": {"plain": {"trajectory_s": 4.0}, "plain compiled": {"trajectory_s": 3.0}},
                  "compiled": {"plain": {"trajectory_s": 1.0}}}
    assert compiled_over_eager(same_phase) == 0.75
    older = {"eager": {"plain": {"trajectory_s": 4.0}}, "compiled": {"plain": {"trajectory_s": 1.0}}}
    assert compiled_over_eager(older) == 0.25
    assert compiled_over_eager({"compiled": {"plain": {"trajectory_s": 1.0}}}) is None
