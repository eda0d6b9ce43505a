"""golfquant: post-training quantization, packing and compression for Parameter Golf artifacts.

In a script: `golfquant.quantize(model, QuantizeOptions(budget=16_000_000)).save(path)` writes the artifact, and
`golfquant.load_artifact(path)` rebuilds the state_dict (the loader `golfquant export-loader` writes does the same
inside a train_gpt.py, whose bytes count).
"""
from golfquant.api import QuantizeResult, quantize, quantize_checkpoint
from golfquant.artifact import load_artifact, read_artifact, write_artifact
from golfquant.errors import GolfquantError
from golfquant.options import QuantizeOptions
from golfquant.roundtrip import roundtrip_eval

__all__ = ["GolfquantError", "QuantizeOptions", "QuantizeResult", "load_artifact", "quantize", "quantize_checkpoint",
           "read_artifact", "roundtrip_eval", "write_artifact"]
