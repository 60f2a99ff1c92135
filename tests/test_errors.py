"""Bad input raises BccError with a stable code and a message that says what to do."""
import pytest
import torch

import bcc
from bcc import BccConfig, BccError, ErrorCode, Schedule

from testing import Toy, built, run, trajectory_inputs


def _code(excinfo):
    return excinfo.value.code


def test_schedule_names_unknown_to_the_model():
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, Schedule.every(2, 2, ["down_blocks.0.attentions.0", "up_blocks.9.attentions.0"]),
                       backend="eager")
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(*args, **kwargs)
    assert _code(e) is ErrorCode.BLOCK_NOT_FOUND
    assert "up_blocks.9.attentions.0" in str(e.value) and "find_blocks" in str(e.value)


def test_set_schedule_with_other_blocks_or_steps():
    fast = bcc.compile(Toy(), Schedule.every(2, 3, ["b0", "b1"]), backend="eager")
    with pytest.raises(BccError) as e:
        fast.set_schedule(Schedule.every(2, 3, ["b0", "bx"]))
    assert _code(e) is ErrorCode.SCHEDULE_MISMATCH
    with pytest.raises(BccError) as e:
        fast.set_schedule(Schedule.every(2, 4, ["b0", "b1"]))
    assert _code(e) is ErrorCode.SCHEDULE_SHAPE


def test_first_row_must_compute():
    with pytest.raises(BccError) as e:
        Schedule(torch.tensor([[False, True]]), ["b0", "b1"])
    assert _code(e) is ErrorCode.SCHEDULE_FIRST_ROW


def test_no_block_matches_selector():
    fast = bcc.compile(Toy(), lambda names: Schedule.every(2, 2, names), blocks="attn*", backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.NO_BLOCKS


def _mid_trajectory(change):
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, 4, names), backend="eager")
    inputs = trajectory_inputs("unet-tiny", model, 4)
    run(fast, inputs[:2])
    (x, t), k = inputs[2]
    x, k = change(x, k)
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(x, t, **k)
    assert fast.bcc_step == 0  # the next call starts a clean trajectory
    run(fast, inputs)
    return e


def test_batch_change_mid_trajectory():
    e = _mid_trajectory(lambda x, k: (x[:1], {**k, "encoder_hidden_states": k["encoder_hidden_states"][:1]}))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED
    assert "shape" in str(e.value) and "step 2 of 4" in str(e.value)


def test_resolution_change_mid_trajectory():
    e = _mid_trajectory(lambda x, k: (torch.nn.functional.interpolate(x, scale_factor=2), k))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED


def test_dtype_change_mid_trajectory():
    e = _mid_trajectory(lambda x, k: (x.double(), k))
    assert _code(e) is ErrorCode.SIGNATURE_CHANGED
    assert "dtype" in str(e.value)


def _checked(num_steps=3):
    model, args, kwargs = built("unet-tiny")
    fast = bcc.compile(model, lambda names: Schedule.every(2, num_steps, names), backend="eager", check=True)
    inputs = trajectory_inputs("unet-tiny", model, num_steps)
    run(fast, inputs)  # records the trajectory's timesteps
    return fast, inputs


def test_step_beyond_schedule_in_check_mode():
    fast, inputs = _checked()
    (x, _t), k = inputs[1]
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(x, torch.tensor(3), **k)  # a 4th step that does not restart the trajectory
    assert _code(e) is ErrorCode.STEP_OVERFLOW
    assert "num_inference_steps" in str(e.value)


def test_timestep_mismatch_in_check_mode():
    fast, inputs = _checked()
    run(fast, inputs[:1])
    (x, _t), k = inputs[1]
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(x, torch.tensor(123), **k)
    assert _code(e) is ErrorCode.STEP_MISMATCH


def test_check_mode_against_schedule_timesteps():
    sched = Schedule(torch.ones(2, 2, dtype=torch.bool), ["b0", "b1"], timesteps=[900, 500])
    fast = bcc.compile(Toy(), sched, backend="eager", check=True)
    fast(torch.ones(2), torch.tensor(900))
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(900))  # called twice at one step
    assert _code(e) is ErrorCode.STEP_MISMATCH


def test_capture_failure_is_explained():
    class DataDependent(torch.nn.Module):
        def forward(self, x, t):
            return x * 2 if x.sum().item() > 0 else x

    fast = bcc.compile(DataDependent(), lambda names: Schedule.every(2, 2, names), backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.CAPTURE_FAILED
    # A value-dependent branch: the message names the model's own line and why no capture helps.
    assert "tensor *values*" in str(e.value) and "x.sum().item() > 0" in str(e.value)
    assert "test_errors.py" in str(e.value) and "DataDependent ('<root>')" in str(e.value)


def test_other_capture_failures_name_the_line_and_the_export_call():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.inner(x) + self.helper(x)

        def helper(self, x):
            raise ValueError("unsupported thing")

    with pytest.raises(BccError) as e:
        bcc.find_blocks(Broken(), ((torch.ones(2), torch.tensor(1.0)), {}))
    assert _code(e) is ErrorCode.CAPTURE_FAILED
    text = str(e.value)
    assert "torch.export.export" in text and "unsupported thing" in text
    assert "in helper" in text and 'raise ValueError("unsupported thing")' in text


@pytest.mark.parametrize("options", [{"mode": "bogus"}, {"nonsense": 1}, {"check": "yes"}, {"inductor_options": 3}])
def test_bad_config(options):
    with pytest.raises(BccError) as e:
        bcc.compile(Toy(), Schedule.every(2, 2, ["b0"]), **options)
    assert _code(e) is ErrorCode.CONFIG_INVALID


def test_not_a_schedule_and_double_compile():
    with pytest.raises(BccError) as e:
        bcc.compile(Toy(), [[True]])
    assert _code(e) is ErrorCode.SCHEDULE_DTYPE
    fast = bcc.compile(Toy(), Schedule.every(2, 2, ["b0"]))
    with pytest.raises(BccError) as e:
        bcc.compile(fast, Schedule.every(2, 2, ["b0"]))
    assert _code(e) is ErrorCode.CONFIG_INVALID
    with pytest.raises(BccError):
        bcc.compile(Toy(), Schedule.every(2, 2, ["b0"]), blocks="b*")


def test_config_replace_is_validated():
    assert BccConfig().replace(mode="output").mode == "output"
    with pytest.raises(BccError):
        BccConfig().replace(mode="x")


def test_schedule_planned_for_another_model():
    from bcc.plan.profile import model_fingerprint

    other = torch.nn.Linear(3, 3)
    profile = bcc.ChangeProfile(torch.tensor([[0.0, 0.0], [0.3, 0.3]]), ["b0", "b1"], fingerprint=model_fingerprint(other))
    schedule = Schedule.from_change(profile, 0.5)
    fast = bcc.compile(Toy(), schedule, backend="eager")
    with pytest.raises(BccError) as e:
        fast(torch.ones(2), torch.tensor(1.0))
    assert _code(e) is ErrorCode.PROFILE_MISMATCH
    assert "bcc.calibrate" in str(e.value)
    mine = bcc.ChangeProfile(profile.l1_rel, ["b0", "b1"], fingerprint=model_fingerprint(Toy()))
    bcc.compile(Toy(), Schedule.from_change(mine, 0.5), backend="eager")(torch.ones(2), torch.tensor(1.0))


def test_a_block_output_sized_by_tensor_values_is_bcc703():
    # HunyuanVideo 1.5 selects text tokens by mask: sizes the static caches cannot hold.
    class Select(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, mask):
            return (x + self.attn(x, x, x)[0])[:, mask]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Select(), torch.nn.Linear(4, 4)

        def forward(self, x, mask):
            return self.head(self.block(x, mask))

    fast = bcc.compile(Net().eval(), bcc.Schedule.every(2, 3, ["block"]), backend="eager")
    with pytest.raises(BccError) as e, torch.no_grad():
        fast(torch.randn(1, 5, 4), torch.tensor([True, True, False, True, True]))
    assert e.value.code is ErrorCode.STATIC_SHAPE and "'block'" in str(e.value) and "pad the tokens" in str(e.value)


def test_value_dependent_code_around_the_blocks_is_said_to_be_there():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Linear(4, 4)

        def forward(self, x):
            if torch.all(x == 0):  # HunyuanVideo 1.5's `is_t2v`, in the model's own forward
                x = x + 1
            return self.block(x)

    with pytest.raises(BccError) as e:
        bcc.find_blocks(Net(), ((torch.ones(2, 4),), {}))
    assert e.value.code is ErrorCode.CAPTURE_FAILED and "outside its blocks" in str(e.value)
    assert "torch.all(x == 0)" in str(e.value) and "select blocks inside it" not in str(e.value)
