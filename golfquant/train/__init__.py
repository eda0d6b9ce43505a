"""Training: the challenge baseline's recipe (Muon + Adam, linear warmdown) and named presets."""
from golfquant.train.loop import TrainConfig, TrainProgress, TrainResult, export_state_dict, train
from golfquant.train.muon import Muon, zeropower_via_newtonschulz5
from golfquant.train.presets import PRESETS, apply_overrides, preset

__all__ = [
    "PRESETS", "Muon", "TrainConfig", "TrainProgress", "TrainResult", "apply_overrides", "export_state_dict",
    "preset", "train", "zeropower_via_newtonschulz5",
]
