"""Run under torchrun: each rank trains scale-shift on its own seeds and saves what it ends with."""
import sys

import torch

import bcc
from bcc.tools import zoo


def main(schedule_path: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    model, _, _ = zoo.build("unet-tiny", latent=8, batch=2)
    spec = zoo.spec_of(model)
    schedule = bcc.Schedule.load(schedule_path)

    def sample(m, cond, seed):
        for step in range(schedule.num_steps):
            a, k = spec.step_inputs(m, step=step, seed=seed, num_steps=schedule.num_steps)
            m(*a, **k)

    ss = bcc.train_scale_shift(model, schedule, sample, [None], iterations=3, kind="table", progress=False)
    ss.save(f"{out_prefix}{rank}.safetensors")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
