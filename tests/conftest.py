import os
import sys

import torch

# The main files sit at the repository root, flat like nanoGPT.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The test models are tiny: one thread avoids thread contention that makes them
# many times slower on a busy two-core machine (torchrun subprocesses set their own).
torch.set_num_threads(1)
