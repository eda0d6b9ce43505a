"""golfquant: post-training quantization, packing and compression for Parameter Golf artifacts.

`from golfquant import load_artifact` is all a train_gpt.py needs to rebuild its state_dict from an artifact.
"""
from golfquant.api import quantize_checkpoint
from golfquant.artifact import load_artifact, read_artifact, write_artifact
from golfquant.errors import GolfquantError
from golfquant.pipeline import QuantizeOptions
from golfquant.roundtrip import roundtrip_eval

__all__ = ["GolfquantError", "QuantizeOptions", "load_artifact", "quantize_checkpoint", "read_artifact",
           "roundtrip_eval", "write_artifact"]
