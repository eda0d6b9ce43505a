import torch

# Tests never assume free cores: torch's threads on a busy core run ~10x slower.
torch.set_num_threads(1)
