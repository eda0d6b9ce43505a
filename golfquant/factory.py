"""The float model a checkpoint is loaded into: our baseline GPT, or the user's own class (`--model FILE.py:CALLABLE`).

User model contract:
* `CALLABLE` is a zero-argument factory function or a class; it is called with the keyword arguments of
  `--model-args` (a JSON object, or `key=value` items whose values are parsed as JSON when they can be) and
  must return an `nn.Module` whose `state_dict()` has exactly the checkpoint's keys and shapes.
* For calibration the model must give logits [B, T, V]: `forward_logits(idx)` when it has one, else
  `forward(idx)`. A `decode(idx_new, cache) -> (logits_last, cache)` method enables KV-cache generation;
  without it generation recomputes the whole prefix at every step (correct, but O(L) times slower).
* Hessians are captured for every `nn.Linear` (subclasses included), keyed `<module name>.weight`, plus
  `tok_emb.weight` from the output of `final_norm` when the model has both and no Linear `lm_head`.

Importing FILE runs its top-level code: the user asked for it by naming the file.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from golfquant.errors import CheckpointError, OptionError
from golfquant.model import GPTConfig, config_from_state_dict, load_weights, model_from_state_dict, shape_mismatch


def parse_model_args(items: str | Sequence[str] | None) -> dict:
    """`--model-args` -> kwargs: one JSON object string, or `key=value` items (value JSON if it parses, else str)."""
    if not items:
        return {}
    if isinstance(items, str):
        items = [items]
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            args = json.loads(items[0])
        except json.JSONDecodeError as e:
            raise OptionError(f"--model-args {items[0]!r} is not valid JSON: {e}") from None
        if not isinstance(args, dict):
            raise OptionError(f"--model-args must be a JSON object, got {items[0]!r}")
        return args
    args = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--model-args item {item!r} is not key=value (or pass one JSON object)")
        try:
            args[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            args[key.strip()] = value
    return args


def _import_file(path: Path):
    """Import a Python file by path under a private module name (its folder is importable while it loads)."""
    name = "golfquant_user_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OptionError(f"--model {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    # dataclasses and pickling look the module up in sys.modules while the file executes.
    sys.modules[name] = module
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise OptionError(f"--model {path}: importing the file failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def load_model_factory(spec: str, model_args: dict | None = None) -> Callable[[], nn.Module]:
    """`FILE.py:CALLABLE` -> a zero-argument function that builds the user's model with `model_args`."""
    file_part, sep, attr = spec.rpartition(":")
    if not sep or not file_part or not attr:
        raise OptionError(f"--model {spec!r} must be FILE.py:CALLABLE, e.g. records/train_gpt.py:GPT")
    path = Path(file_part)
    if not path.is_file():
        raise OptionError(f"--model {spec!r}: file {path} not found")
    module = _import_file(path)
    obj = getattr(module, attr, None)
    if not callable(obj):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise OptionError(f"--model {spec!r}: {path} defines no callable {attr!r}; callables there: {public[:12]}")
    kwargs = dict(model_args or {})

    def build() -> nn.Module:
        try:
            model = obj(**kwargs)
        except TypeError as e:
            raise OptionError(f"--model {spec!r}: calling {attr}(**{kwargs}) failed: {e}; "
                              "pass the constructor's arguments with --model-args") from e
        if not isinstance(model, nn.Module):
            raise OptionError(f"--model {spec!r}: {attr}(...) returned {type(model).__name__}, not an nn.Module")
        return model

    return build


def build_model(state_dict: dict[str, torch.Tensor], config_dict: dict | None = None, model_spec: str | None = None,
                num_heads: int | None = None, model_args: dict | None = None, share: bool = False) -> nn.Module:
    """The float model holding `state_dict`, loaded with strict=True (`share`: model.load_weights).

    Without `model_spec` it is our GPT, configured by `config_dict` (the checkpoint's) or inferred from the
    tensor shapes (`num_heads` None = from q_gain). With `model_spec` (`FILE.py:CALLABLE`) it is the user's
    model built with `model_args`. Raises CheckpointError naming the first missing/unexpected/misshapen keys.
    """
    if model_spec is None:
        config = GPTConfig.from_dict(config_dict) if config_dict is not None \
            else config_from_state_dict(state_dict, num_heads)
        return model_from_state_dict(state_dict, config, share)
    model = load_model_factory(model_spec, model_args)()
    problem = shape_mismatch(state_dict, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if problem:
        raise CheckpointError(f"checkpoint does not fit --model {model_spec}: {problem}")
    load_weights(model, state_dict, share)
    return model
