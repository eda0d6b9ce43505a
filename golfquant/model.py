"""The challenge's baseline GPT (root `train_gpt.py`, brief §1.1), with a KV cache for incremental decoding.

`GPT(config).state_dict()` has exactly the baseline's keys, shapes and order, so the challenge's own
`final_model.pt` loads with `strict=True`. Forward pass: embed -> rms_norm -> U-Net of blocks with learned skip
weights -> rms_norm -> tied head -> logit softcap. Linear layers are `CastedLinear`: fp32 weights cast to the
activation dtype at matmul time, so the same module runs in fp32 on CPU and under bf16 autocast on GPU.
The config inference from a bare state_dict's shapes sits beside the model: it is the model's layout, read back.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from golfquant.errors import CheckpointError, OptionError


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005
    seq_len: int = 1024  # training context; evaluation and calibration default to it

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "seq_len"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if not problems:
            if self.model_dim % self.num_heads:
                problems.append(f"model_dim={self.model_dim} must be divisible by num_heads={self.num_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim={self.head_dim} (model_dim/num_heads) must be even for RoPE")
            if self.num_heads % self.num_kv_heads:
                problems.append(f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        if self.logit_softcap <= 0:
            problems.append(f"logit_softcap={self.logit_softcap} must be positive")
        if problems:
            raise OptionError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_mult * self.model_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(
                f"model config has unknown keys {unknown}; known keys: {sorted(known)} "
                "(was it written by a newer golfquant or for another architecture?)"
            )
        try:
            return cls(**d)
        except OptionError as e:
            raise CheckpointError(f"model config in the checkpoint is invalid: {e}") from None


class RMSNorm(nn.Module):
    """Weightless RMSNorm (eps = the dtype's machine epsilon, as F.rms_norm picks when eps is None)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Keeps its weight in fp32 for the optimizer; casts it to the activation dtype at matmul time.

    `weight_hook`, when set, maps the weight before the cast (QAT's fake quantization, golfquant.train.qat);
    a hook must keep its buffers non-persistent so that the state_dict keys stay the baseline's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_hook: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight_hook is None else self.weight_hook(self.weight)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w.to(x.dtype), bias)


class Rotary(nn.Module):
    """RoPE tables for absolute positions; `inv_freq` is not persistent, so it stays out of the state_dict."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: Tensor | None = None
        self._sin: Tensor | None = None

    def forward(self, start: int, length: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape [1, 1, length, head_dim/2] for positions start..start+length-1."""
        end = start + length
        # A table made under inference_mode cannot enter autograd (the sensitivity pass backpropagates): remake it.
        stale = self._cos is not None and self._cos.is_inference() and not torch.is_inference_mode_enabled()
        if self._cos is None or self._cos.size(0) < end or self._cos.device != device or stale:
            # Row p of the table is p * inv_freq in fp32 whatever the table length, so a slice of a longer
            # table is bit-identical to the baseline's per-length table.
            t = torch.arange(max(end, 2 * start), device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cos, self._sin = freqs.cos(), freqs.sin()
        return (self._cos[start:end].to(dtype)[None, None], self._sin[start:end].to(dtype)[None, None])


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class LayerCache:
    """Keys and values of one attention layer, [B, kv_heads, capacity, head_dim], written in place.

    The first append allocates max(`capacity`, 64) positions; beyond that the buffers grow by doubling.
    """

    def __init__(self, capacity: int = 0) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0
        self.capacity = capacity

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new keys/values; return all keys/values so far (views into the buffers)."""
        t = k.size(2)
        end = self.length + t
        if self.k is None or self.k.size(2) < end:
            cap = max(end, 2 * self.k.size(2) if self.k is not None else self.capacity, 64)
            new_k = k.new_empty(k.size(0), k.size(1), cap, k.size(3))
            new_v = v.new_empty(v.size(0), v.size(1), cap, v.size(3))
            if self.k is not None:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Per-layer key/value caches plus the number of positions already decoded. Updated in place by decode.

    `capacity` positions are reserved on the first append, so decoding up to it never copies the cache.
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.layers = [LayerCache(capacity) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.c_k = CastedLinear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.c_v = CastedLinear(cfg.model_dim, cfg.kv_dim, bias=False)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        bsz, t, dim = x.shape
        start = cache.length if cache is not None else 0
        q = self.c_q(x).reshape(bsz, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(start, t, x.device, q.dtype)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        if cache is not None:
            k, v = cache.append(k, v)
        gqa = self.num_kv_heads != self.num_heads
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif t == 1:
            y = _single_query_attention(q, k, v)
        else:
            # SDPA's is_causal aligns the mask top-left; with a cached prefix query i sees keys 0..start+i.
            mask = None
            if t > 1:
                qpos = torch.arange(start, start + t, device=x.device)[:, None]
                mask = torch.arange(start + t, device=x.device)[None, :] <= qpos
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(bsz, t, dim))


def _single_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of one new query per sequence against all cached keys: q [B, H, 1, D], k/v [B, KV, L, D].

    Two batched matmuls: 10-20x faster on CPU than SDPA's flash kernel, which is tuned for long query blocks.
    Query heads are grouped as SDPA's enable_gqa does (head h reads kv head h // (H / KV)); no mask is needed
    since every cached position precedes the query.
    """
    bsz, heads, _, dim = q.shape
    kv_heads = k.size(1)
    qg = q.reshape(bsz, kv_heads, heads // kv_heads, dim)
    att = torch.softmax((qg @ k.transpose(-1, -2)) * dim**-0.5, dim=-1)
    return (att @ v).reshape(bsz, heads, 1, dim)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = CastedLinear(cfg.model_dim, cfg.mlp_hidden, bias=False)
        self.proj = CastedLinear(cfg.mlp_hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(cfg.model_dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(cfg.model_dim), torch.zeros(cfg.model_dim))))

    def forward(self, x: Tensor, x0: Tensor, cache: LayerCache | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x), cache)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.num_encoder_layers = config.num_layers // 2
        self.num_decoder_layers = config.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        # state_dict order = own parameters (skip_weights) first, then children in registration order:
        # tok_emb, blocks, lm_head (untied only); the same as the baseline's.
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if config.tie_embeddings else CastedLinear(config.model_dim, config.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self._init_weights()

    def _init_weights(self) -> None:
        if self.config.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=self.config.tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def _hidden(self, idx: Tensor, cache: KVCache | None) -> Tensor:
        x = self.tok_emb(idx)
        x = F.rms_norm(x, (x.size(-1),))
        x0 = x
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        skips: list[Tensor] = []
        for i in range(self.num_encoder_layers):
            x = self.blocks[i](x, x0, layer_caches[i])
            skips.append(x)
        for i in range(self.num_decoder_layers):
            if skips:
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            j = self.num_encoder_layers + i
            x = self.blocks[j](x, x0, layer_caches[j])
        return self.final_norm(x)

    def _logits(self, h: Tensor) -> Tensor:
        if self.lm_head is not None:
            logits = self.lm_head(h)
        else:
            logits = F.linear(h, self.tok_emb.weight.to(h.dtype))
        cap = self.config.logit_softcap
        if not torch.is_grad_enabled():  # in place when no graph needs the intermediates: [B, T, V] is the largest
            return logits.div_(cap).tanh_().mul_(cap)
        return cap * torch.tanh(logits / cap)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy (fp32) of `targets` [B, T] given `idx` [B, T]."""
        logits = self._logits(self._hidden(idx, None))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="mean")

    def forward_logits(self, idx: Tensor) -> Tensor:
        """Softcapped logits [B, T, V] for every position."""
        return self._logits(self._hidden(idx, None))

    def decode(self, idx_new: Tensor, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """Feed `idx_new` [B, t] after the positions already in `cache` (a new one when None).

        Returns the logits of the last new position [B, V] and the cache, updated in place. Equals
        `forward_logits` on the whole prefix up to float rounding; RoPE positions continue from the cache.
        """
        if cache is None:
            # seq_len + 1: a full training-length sequence plus the extra step that feeds its last token
            # (calibration captures that token's activations).
            cache = KVCache(len(self.blocks), self.config.seq_len + 1)
        h = self._hidden(idx_new, cache)
        return self._logits(h[:, -1]), cache


# ---------------------------------------------------------------- config from a bare state_dict
_BLOCK_KEY_RE = re.compile(r"^blocks\.(\d+)\.")


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """State-dict keys (in order) and shapes of GPT(config), computed without allocating weights."""
    with torch.device("meta"):
        model = GPT(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def config_from_state_dict(sd: dict[str, Tensor], num_heads: int | None = None, **overrides) -> GPTConfig:
    """Infer the GPTConfig of a bare baseline state_dict (such as the challenge's `final_model.pt`) from shapes.

    vocab and width come from `tok_emb.weight`, depth from the block indices, heads from `q_gain`
    (`num_heads`, if given, must agree), KV heads from the rows of `c_k`, mlp_mult from `mlp.fc`, tying from
    the absence of `lm_head.weight`. Settings that leave no trace in shapes (seq_len, rope_base,
    logit_softcap, ...) take the baseline's defaults unless given in `overrides`.
    """
    def need(key: str) -> Tensor:
        if key not in sd:
            raise CheckpointError(f"state_dict has no {key!r}; it does not look like the challenge's baseline GPT")
        t = sd[key]
        if not isinstance(t, Tensor):
            raise CheckpointError(f"state_dict entry {key!r} is not a tensor")
        return t

    emb = need("tok_emb.weight")
    if emb.ndim != 2:
        raise CheckpointError(f"tok_emb.weight has shape {tuple(emb.shape)}, expected [vocab, dim]")
    vocab, dim = emb.shape
    layers = sorted({int(m.group(1)) for k in sd if (m := _BLOCK_KEY_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise CheckpointError(f"state_dict blocks are {layers[:12]}, expected blocks.0 .. blocks.N-1")
    q_gain = need("blocks.0.attn.q_gain")
    heads = int(q_gain.numel())
    if num_heads is not None and num_heads != heads:
        raise CheckpointError(f"num_heads={num_heads} was given but blocks.0.attn.q_gain has {heads} entries")
    if heads < 1 or dim % heads:
        raise CheckpointError(f"model_dim {dim} is not divisible by {heads} heads (from q_gain)")
    head_dim = dim // heads
    kv_rows = need("blocks.0.attn.c_k.weight").shape[0]
    fc_rows = need("blocks.0.mlp.fc.weight").shape[0]
    if kv_rows % head_dim or fc_rows % dim:
        raise CheckpointError(
            f"c_k has {kv_rows} rows (head_dim {head_dim}) and mlp.fc {fc_rows} rows (dim {dim}); "
            "expected whole KV heads and an integer MLP multiple of the baseline layout"
        )
    values = dict(vocab_size=int(vocab), num_layers=len(layers), model_dim=int(dim), num_heads=heads,
                  num_kv_heads=kv_rows // head_dim, mlp_mult=fc_rows // dim,
                  tie_embeddings="lm_head.weight" not in sd)
    values.update(overrides)
    try:
        config = GPTConfig(**values)
    except OptionError as e:
        raise CheckpointError(f"state_dict shapes give an impossible config: {e}") from None
    check_state_dict(sd, config)
    return config


def shape_mismatch(sd: Mapping[str, Tensor], want: Mapping[str, tuple[int, ...]]) -> str | None:
    """How `sd`'s keys and shapes differ from `want`'s (the first few missing, unexpected and misshapen keys), or
    None when they match."""
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k])}" for k in want if k in sd
             and tuple(sd[k].shape) != tuple(want[k])]
    parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}"
             for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    return "; ".join(parts) or None


def check_state_dict(sd: dict[str, Tensor], config: GPTConfig) -> None:
    """CheckpointError unless `sd` has exactly GPT(config)'s keys and shapes (names the first differences)."""
    problem = shape_mismatch(sd, expected_shapes(config))
    if problem:
        raise CheckpointError(f"state_dict does not fit the baseline GPT {config.to_dict()}: {problem}")


def load_weights(model: nn.Module, sd: dict[str, Tensor], share: bool = False) -> None:
    """model.load_state_dict(sd, strict=True). With `share`, when every tensor of sd already has its parameter's
    dtype and device, the model holds sd's tensors themselves instead of copies (the caller keeps sd as it is
    only if it never writes the model's weights)."""
    share = share and all(sd[k].dtype == v.dtype and sd[k].device == v.device
                          for k, v in model.state_dict().items() if k in sd)
    model.load_state_dict(sd, strict=True, assign=share)


def model_from_state_dict(sd: dict[str, Tensor], config: GPTConfig | None = None, share: bool = False) -> GPT:
    """A GPT holding `sd` (loaded strict; bf16 tensors are upcast into the fp32 parameters; `share`: load_weights)."""
    config = config if config is not None else config_from_state_dict(sd)
    check_state_dict(sd, config)
    model = GPT(config)
    load_weights(model, sd, share)
    return model
