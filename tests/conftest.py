"""Make the flat top-level modules importable from tests/ and keep torch to one thread."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: threads cost more than they give
