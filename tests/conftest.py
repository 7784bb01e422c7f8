import os
import sys
import tempfile
import zlib

import pytest
import torch

# A private inductor cache per run: a cache shared with other checkouts can hold graphs compiled
# against another version of an op's schema.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ssm_ext_inductor_"))

# Make `helpers` importable as a plain module from the test files.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped when none is present)")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch per test, from the test id, so each test draws fresh but reproducible inputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    yield
