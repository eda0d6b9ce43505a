import os

import torch

# Tests never assume free cores: torch's threads on a busy core run ~10x slower.
torch.set_num_threads(1)
# Triton kernels run on the CPU interpreter here; the variable must be set before `kernels` is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(items):
    """Files with a slow test first (whole files, so that module fixtures are built once): under `-n 2` the
    longest file then starts at once instead of ending the run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
