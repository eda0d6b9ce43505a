import os

import torch

# Tests never assume free cores: torch's threads on a busy core run ~10x slower.
torch.set_num_threads(1)
# Triton kernels run on the CPU interpreter here; the variable must be set before `kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
