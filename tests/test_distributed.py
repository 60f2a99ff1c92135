"""`bcc calibrate` under torchrun (2 processes, gloo) equals the single-process profile."""
import os
import subprocess
import sys

import pytest
import torch

from bcc import ChangeProfile
from bcc.tools.cli import main

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

CASES = {
    # 3 runs over 2 ranks: rank 0 takes two, rank 1 one.
    "zoo-uneven": ["--model", "zoo:unet-tiny", "--steps", "4", "--seeds", "0,1,2"],
    # 1 run over 2 ranks: rank 1 has nothing to do but must still join the reduction.
    "digits-idle-rank": ["--model", "digits-unet", "--steps", "4", "--classes", "3", "--seeds", "5",
                         "--per-class", "1", "--guidance", "2.0"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_torchrun_matches_single_process(case, tmp_path):
    argv = ["calibrate", *CASES[case], "--threads", "1"]
    dist_out, single_out = tmp_path / "dist.json", tmp_path / "single.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bcc.tools.cli",
         *argv, "--out", str(dist_out)],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("wrote ") == 1  # only rank 0 prints and writes
    assert "on 2 processes" in r.stdout

    assert main([*argv, "--out", str(single_out)]) == 0
    d, s = ChangeProfile.load(dist_out), ChangeProfile.load(single_out)
    assert d.block_names == s.block_names and d.num_runs == s.num_runs and d.timesteps == s.timesteps
    assert d.fingerprint == s.fingerprint  # stable across processes (private config keys are skipped)
    assert d.block_flops == s.block_flops
    torch.testing.assert_close(d.l1_rel, s.l1_rel, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.l1_std, s.l1_std, rtol=0, atol=1e-12)
    assert d.extra["cli"]["world_size"] == 2 and s.extra["cli"]["world_size"] == 1
    assert float(s.l1_rel[1:].min()) > 0  # the runs measured something
