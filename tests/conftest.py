import os

import pytest
import torch

from bcc import zoo

# Under pytest-xdist each worker gets one core: two workers with two threads each
# would oversubscribe the two-core CI machine.
_DEFAULT_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("BCC_TEST_THREADS", _DEFAULT_THREADS)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


_BUILT: dict = {}


def built(name: str, latent: int = 8, batch: int = 2):
    """Session-cached zoo model (weights never change, so sharing is safe)."""
    key = (name, latent, batch)
    if key not in _BUILT:
        _BUILT[key] = zoo.build(name, latent=latent, batch=batch)
    return _BUILT[key]


def trajectory_inputs(name: str, model, num_steps: int, *, latent: int = 8, batch: int = 2, seed: int = 0):
    _n, extra, _l, _b = model._bcc_zoo
    return [zoo.step_inputs(name, model, extra, latent=latent, batch=batch, step=s, seed=seed, num_steps=num_steps)
            for s in range(num_steps)]


def first_tensor(out):
    return torch.utils._pytree.tree_leaves(out)[0]


def run(model, inputs):
    with torch.no_grad():
        return [first_tensor(model(*a, **k)) for a, k in inputs]
