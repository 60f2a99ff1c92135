import os

import pytest
import torch

# Under pytest-xdist each worker gets one core: two workers with two threads each
# would oversubscribe the two-core CI machine.
_DEFAULT_THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
torch.set_num_threads(int(os.environ.get("BCC_TEST_THREADS", _DEFAULT_THREADS)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
