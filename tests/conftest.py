"""Make the flat top-level modules importable from tests/, keep torch to one thread, share a warm
model; the `cuda` mark (tests that need a GPU: `pytest -m cuda`, run by `bench.py --gpu-check`)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models: threads cost more than they give
# a test that needs CUDA: marked (pytest -m cuda selects them) and skipped, saying why, without a GPU
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no GPU here")]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; `pytest -m cuda` runs them)")


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """A briefly supervised tiny model: it writes parseable boxes, so rewards differ within groups."""
    out = str(tmp_path_factory.mktemp("warm") / "run")
    import train
    train.main(["--algo", "sft", "--dataset", "synth:derm", "--steps", "100", "--batch-prompts", "16",
                "--lr", "3e-3", "--out", out, "--eval-dataset", "none", "--threads", "1"])
    return os.path.join(out, "final")
