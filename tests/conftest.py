"""Make the flat top-level modules importable from tests/, keep torch to one thread, share a warm model."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def warm(tmp_path_factory):
    """A briefly supervised tiny model: it writes parseable boxes, so rewards differ within groups."""
    out = str(tmp_path_factory.mktemp("warm") / "run")
    import train
    train.main(["--algo", "sft", "--dataset", "synth:derm", "--steps", "100", "--batch-prompts", "16",
                "--lr", "3e-3", "--out", out, "--eval-dataset", "none", "--threads", "1"])
    return os.path.join(out, "final")
