import copy
import json
import pickle

import pytest
import torch

from bcc import BccError, ErrorCode, Schedule


def test_every_and_all_compute():
    s = Schedule.every(3, 7, ["a", "b"])
    assert s.mask[:, 0].tolist() == [True, False, False, True, False, False, True]
    assert torch.equal(s.mask[:, 0], s.mask[:, 1])
    assert Schedule.all_compute(4, 3).mask.all()
    assert Schedule.all_compute(4, 3).block_names == ("block0", "block1", "block2")


def test_compute_fraction_and_speedup():
    s = Schedule.every(2, 4, ["a", "b"])
    assert s.compute_fraction() == 0.5
    assert s.ideal_speedup() == 2.0
    assert s.compute_fraction([3.0, 1.0], rest_cost=4.0) == pytest.approx(0.75)


def test_mask_is_copied_and_frozen():
    mask = torch.ones(2, 1, dtype=torch.bool)
    s = Schedule(mask, ["a"])
    mask[1, 0] = False
    assert s.mask[1, 0]
    with pytest.raises(Exception):
        s.mask = mask  # frozen dataclass


@pytest.mark.parametrize(
    "mask, names, code",
    [
        (torch.ones(2, 2), ["a", "b"], ErrorCode.SCHEDULE_DTYPE),
        ([[True]], ["a"], ErrorCode.SCHEDULE_DTYPE),
        (torch.ones(2, dtype=torch.bool), ["a", "b"], ErrorCode.SCHEDULE_SHAPE),
        (torch.ones(0, 2, dtype=torch.bool), ["a", "b"], ErrorCode.SCHEDULE_SHAPE),
        (torch.ones(2, 2, dtype=torch.bool), ["a"], ErrorCode.SCHEDULE_NAMES),
        (torch.ones(2, 2, dtype=torch.bool), ["a", "a"], ErrorCode.SCHEDULE_NAMES),
        (torch.tensor([[True, False], [True, True]]), ["a", "b"], ErrorCode.SCHEDULE_FIRST_ROW),
    ],
)
def test_invalid_schedules(mask, names, code):
    with pytest.raises(BccError) as e:
        Schedule(mask, names)
    assert e.value.code is code
    assert str(e.value).startswith(f"[{code.value}]")


def test_first_row_message_names_blocks_and_fix():
    with pytest.raises(BccError, match=r"reuses \['b'\]. Set mask\[0\] = True"):
        Schedule(torch.tensor([[True, False]]), ["a", "b"])


def test_reorder_and_mismatch():
    s = Schedule(torch.tensor([[True, True], [True, False]]), ["a", "b"])
    r = s.reorder(["b", "a"])
    assert r.mask.tolist() == [[True, True], [False, True]]
    with pytest.raises(BccError) as e:
        s.reorder(["a", "c"])
    assert e.value.code is ErrorCode.SCHEDULE_MISMATCH
    assert "find_blocks" in str(e.value)


def test_every_rejects_bad_n():
    with pytest.raises(BccError):
        Schedule.every(0, 4, 2)


def test_text_table():
    text = Schedule.every(2, 3, ["blk"]).to_text()
    assert text.splitlines() == ["step 012", " blk #.#"]  # columns under their steps


def test_meta_is_a_read_only_copy():
    meta = {"source": "p.json", "scheduler": {"name": "DDIM", "config": {"betas": [1, 2]}}}
    s = Schedule.every(2, 3, ["a"]).with_meta(**meta)
    meta["source"] = "changed"
    meta["scheduler"]["name"] = "changed"
    assert s.meta["source"] == "p.json" and s.meta["scheduler"]["name"] == "DDIM"
    with pytest.raises(TypeError):
        s.meta["source"] = "other"
    with pytest.raises(TypeError):
        s.meta["scheduler"]["config"]["betas"] = []
    assert s.meta["scheduler"]["config"]["betas"] == (1, 2)
    with pytest.raises(BccError) as e:
        Schedule(torch.ones(1, 1, dtype=torch.bool), ["a"], meta=["not", "a", "mapping"])
    assert e.value.code is ErrorCode.CONFIG_INVALID


def test_with_meta_returns_a_new_schedule_and_files_keep_meta(tmp_path):
    s = Schedule.every(2, 3, ["a"]).with_meta(threshold=0.5)
    t = s.with_meta(profile="p.json")
    assert "profile" not in s.meta and dict(t.meta) == {"threshold": 0.5, "profile": "p.json"}
    assert torch.equal(t.mask, s.mask) and t.block_names == s.block_names
    assert json.loads(json.dumps(t.to_dict()))["meta"] == {"threshold": 0.5, "profile": "p.json"}
    t.save(tmp_path / "s.json")
    assert dict(Schedule.load(tmp_path / "s.json").meta) == dict(t.meta)
    for u in (copy.deepcopy(t), pickle.loads(pickle.dumps(t)), t.reorder(["a"])):
        assert dict(u.meta) == dict(t.meta) and torch.equal(u.mask, t.mask)
