"""Training: the challenge baseline's recipe (Muon + Adam, linear warmdown), one process or torchrun DDP on
any world size that splits the global batch into whole sequences, with optional EMA, torch.compile, QAT and
resumable checkpoints; and named presets."""
from golfquant.train.batches import BatchLayout, batch_layout
from golfquant.train.loop import TrainConfig, TrainProgress, TrainResult, export_state_dict, train
from golfquant.train.muon import Muon, zeropower_via_newtonschulz5
from golfquant.train.presets import PRESETS, apply_overrides, preset
from golfquant.train.qat import attach_qat, detach_qat, fake_quantize, parse_qat, refresh_qat, set_qat

__all__ = [
    "PRESETS", "BatchLayout", "Muon", "TrainConfig", "TrainProgress", "TrainResult", "apply_overrides",
    "attach_qat", "batch_layout", "detach_qat", "export_state_dict", "fake_quantize", "parse_qat",
    "preset", "refresh_qat", "set_qat", "train", "zeropower_via_newtonschulz5",
]
