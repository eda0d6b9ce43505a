"""The roundtrip: artifact -> dequantized state_dict -> model -> val_bpb, beside the float checkpoint's val_bpb."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from golfquant.artifact import load_artifact, read_artifact
from golfquant.calib import declared_seq_len, vocab_size
from golfquant.checkpoint import Checkpoint, load_checkpoint
from golfquant.data import ByteLUTs, build_byte_luts, check_tokenizer_fits, check_tokens_fit, load_tokens
from golfquant.distributed import current, resolve_device
from golfquant.errors import OptionError
from golfquant.evaluate import EvalResult, eval_val_bpb
from golfquant.factory import build_model
from golfquant.model import shape_mismatch
from golfquant.pipeline import Progress, stage


@dataclass
class RoundtripOptions:
    val_pattern: str
    tokenizer: str
    max_tokens: int | None = None  # None: every validation token
    seq_len: int | None = None  # None: the model's declared one (prepare_eval)
    stride: int | None = None
    batch_seqs: int = 16
    num_heads: int | None = None
    model_spec: str | None = None
    model_args: dict | None = None
    packed: bool = False  # run quantized Linears from packed codes (kernels.QuantLinear)
    device: str = "auto"  # auto (CUDA when available), cpu, cuda or cuda:N


@dataclass
class EvalSetup:
    """The float model and what its val_bpb needs, loaded once and checked against each other."""

    model: torch.nn.Module
    tokens: torch.Tensor
    luts: ByteLUTs
    seq_len: int


def prepare_eval(ckpt: Checkpoint, val_pattern: str, tokenizer, max_tokens: int | None, seq_len: int | None = None,
                 model_spec: str | None = None, num_heads: int | None = None,
                 model_args: dict | None = None) -> EvalSetup:
    """The first max_tokens + 1 validation tokens (all when None), the tokenizer's byte tables, the float model.

    seq_len None: the one the model declares, found as calibration finds it (model.config.seq_len, else the
    model's seq_len or train_seq_len); OptionError when it declares none.
    """
    model = build_model(ckpt.state_dict, ckpt.config, model_spec, num_heads, model_args).eval()
    if seq_len is None:
        seq_len = declared_seq_len(model)
        if seq_len is None:
            raise OptionError("the model does not state its sequence length (config.seq_len, seq_len or "
                              "train_seq_len); pass the evaluation seq_len (--seq-len)")
    vocab = vocab_size(model)
    luts = build_byte_luts(tokenizer, vocab)
    check_tokenizer_fits(luts, vocab)
    tokens = load_tokens(val_pattern, None if max_tokens is None else max_tokens + 1)
    check_tokens_fit(tokens, min(vocab, luts.tokenizer_vocab))
    return EvalSetup(model, tokens, luts, seq_len)


@dataclass
class RoundtripResult:
    """The float model and the artifact's dequantized weights, evaluated on the same tokens."""

    float_model: EvalResult
    quantized: EvalResult
    seq_len: int
    stride: int | None
    packed: bool
    device: str
    processes: int  # torchrun's world size: the evaluation batches were shared over this many

    @property
    def gap_bpb(self) -> float:
        return self.quantized.val_bpb - self.float_model.val_bpb


def roundtrip_eval(artifact_path, ckpt_path, opts: RoundtripOptions,
                   progress: Progress | None = None) -> RoundtripResult:
    """val_loss / val_bpb of the float checkpoint and of the artifact's dequantized weights, on the same tokens.

    Under torchrun the evaluation batches are shared over the processes (eval_val_bpb); each returns the result."""
    device = resolve_device(opts.device)
    ev = prepare_eval(load_checkpoint(ckpt_path), opts.val_pattern, opts.tokenizer, opts.max_tokens, opts.seq_len,
                      opts.model_spec, opts.num_heads, opts.model_args)
    model, seq_len = ev.model.to(device), ev.seq_len

    def run(name: str) -> EvalResult:
        return eval_val_bpb(model, ev.tokens, ev.luts, seq_len, batch_seqs=opts.batch_seqs, stride=opts.stride,
                            device=device, progress=stage(progress, name))

    float_res = run("float")
    load_quantized_weights(model, artifact_path, opts.packed)
    return RoundtripResult(float_res, run("quantized"), seq_len, opts.stride, opts.packed, str(device),
                           current().world_size)


def load_quantized_weights(model: torch.nn.Module, artifact_path, packed: bool = False) -> None:
    """Load the artifact's dequantized state_dict into the model; a shape mismatch names the tensor.

    packed=True keeps every quantized Linear weight packed: the Linear becomes a kernels.QuantLinear that
    dequantizes inside its matmul, so no float copy of those weights is made.
    """
    sd = load_artifact(artifact_path)
    own = model.state_dict()
    _check_same_tensors(own, sd, artifact_path)
    if packed:
        swapped = _swap_packed_linears(model, artifact_path)
        sd = {k: v for k, v in sd.items() if k not in swapped}
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=not packed)


def _swap_packed_linears(model: torch.nn.Module, artifact_path) -> set[str]:
    from kernels import PackedWeight, swap_linears

    modules = dict(model.named_modules())
    weights = {name: value for name, value in read_artifact(artifact_path, packed=True).tensors.items()
               if isinstance(value, PackedWeight) and name.endswith(".weight")
               and isinstance(modules.get(name.rsplit(".", 1)[0]), torch.nn.Linear)}
    swap_linears(model, weights)
    return set(weights)


def _check_same_tensors(own: dict, sd: dict, artifact_path) -> None:
    problem = shape_mismatch(sd, {k: tuple(v.shape) for k, v in own.items()})
    if problem:
        raise OptionError(f"artifact {artifact_path} does not match the model: {problem}")
