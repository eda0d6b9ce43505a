"""Per-row clip (scale) selection for symmetric integer codes, fixed before any GPTQ sweep.

A row with clip c gets the fp16 scale s = c / qmax(bits); codes are clamp(round(w / s), -qmax, qmax).

Clip spec grammar (`parse_clip`): ``METHOD[:ARGS]``, ARGS comma-separated, positional values first, then
``key=value`` pairs; numbers are decimal floats (``grid`` an integer).

* ``amax``: c = max|w_row|.
* ``pct:P``: c = the P-th percentile of |w_row| (P in percent, 50 <= P <= 100, linear interpolation);
  ``pct:99.99984`` is the challenge baseline, ``pct:100`` equals ``amax``.
* ``mse[:NORM]``, keys ``norm`` (default 2.4, as the reference GPTQ quantizer and llm-compressor), ``grid``
  (100) and ``maxshrink`` (0.8): per row, try c = p·max|w_row| for p = 1 - i/grid, i < maxshrink·grid, and
  keep the p minimising sum_j |w_j - q_j·s|^NORM at the fp16-rounded scale (ties keep the larger p).
* ``sdclip[:K]`` or ``sdclip:mlp=K,attn=K,embed=K,other=K,control=K,default=K``: c = k·std(w_row) (unbiased
  std, as in the records), k chosen by the tensor's role. A positional K is ``default=K``. An explicit K is used
  as given. Roles not named use ``default`` if it is given, else the records' constants (`RECORD_K`;
  `record_k`):

  ======== ===================== =================================================
  role     width: k              record
  ======== ===================== =================================================
  mlp      int6: 12              04-14 (MLP_CLIP_SIGMAS)
  attn     int6: 13              04-14 (ATTN_CLIP_SIGMAS)
  embed    int7: 15, int8: 20    04-14 (EMBED_BITS=7), 04-05 SDClip (EMBED_CLIP_SIGMAS)
  default  int6: 12.85           04-05 and 04-14 (MATRIX_CLIP_SIGMAS): other, control
  ======== ===================== =================================================

  At a width the records used for that role, k is theirs (bare ``sdclip`` at an int8 embedding gives 20, at
  int7 15). At another width b it is the k of the nearest record width w scaled by 2^(b - w), the records' own
  equivalence (b, k) ~ (b+1, 2k), so that the quantization step k·σ/qmax stays that record's (bare ``sdclip``
  at int4 clips MLP rows at 3σ, not 12σ; an int6 embedding gets 7.5).
* ``hsdclip[:K[,LAMBDA]]`` (same role keys, plus ``lambda``, default 0.175): Hessian-aware SDClip,
  c_i = k·σ_i·[1 + λ(r_i - 1)], r_i = mean_j(|W_ij|·col_imp_j) normalised to mean 1 over rows,
  col_imp = diag(H) / mean(diag(H)). Needs the tensor's Hessian. 0 <= λ <= 1 keeps every clip >= 0.
* ``size[:BPW]``: spend a byte budget, not a nominal width. The target is BPW bits per weight of order-0
  code entropy (`entropy_bits`), which the codecs track; without BPW the caller (the size allocator) must set
  ``target_bpw``. Candidates are SDClip row profiles c_i = k·σ_i. Code entropy rises with k while clipping
  saturates most codes at ±qmax, peaks, then falls; only the falling branch is searched. Definition:
  1. k_peak = argmax of the entropy over log2 k in [-4, 12] (golden-section search);
  2. k_t = the smallest k >= k_peak whose RTN codes have entropy <= BPW (bisection on log2 k; k_t = k_peak
     when even the peak is under BPW);
  3. scan k = k_t·2^(j/8), j = 0, 1, ... (<= 2^12), keeping candidates whose entropy is <= BPW, and stop
     after 3 consecutive candidates that do not lower the error;
  4. return the candidate with the least Hessian-weighted RTN error tr(E H Eᵀ) (‖E‖² without a Hessian).
  The error is U-shaped in k with its minimum on the falling branch, so a binding target lands on k_t
  (entropy just under BPW) and a loose one on the error optimum.

Scales are computed in fp32, clamped to [2^-24, 65504] (fp16's smallest subnormal: a zero row gets zero
codes, never 0/0) and rounded to fp16 before any code is computed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from golfquant.codec.entropy import order0_bits
from golfquant.errors import OptionError
from golfquant.quant.qtensor import qmax

ROLE_KEYS = ("mlp", "attn", "embed", "other", "control")
# The records' SDClip k: role (or "default") -> {code width: k} (module docstring).
RECORD_K = {"mlp": {6: 12.0}, "attn": {6: 13.0}, "embed": {7: 15.0, 8: 20.0}, "default": {6: 12.85}}
RECORD_LAMBDA = 0.175  # 04-06 record (HESSIAN_CLIP_LAMBDA)
SCALE_MIN = 2.0**-24
SCALE_MAX = 65504.0

_K_KEYS = ROLE_KEYS + ("default",)
_POSITIONAL = {"amax": (), "pct": ("p",), "mse": ("norm",), "sdclip": ("default",),
               "hsdclip": ("default", "lambda"), "size": ("bpw",)}
_KEYS = {"amax": (), "pct": ("p",), "mse": ("norm", "grid", "maxshrink"), "sdclip": _K_KEYS,
         "hsdclip": _K_KEYS + ("lambda",), "size": ("bpw",)}
_EXAMPLES = ("amax, pct:99.99984, mse:2.4, sdclip:12.85, sdclip:mlp=12,attn=13,default=12.85, "
             "hsdclip:12.85,0.175, size:3.5")
_SIZE_K_RANGE = (-4.0, 12.0)  # log2 k
_SIZE_SCAN_STEP = 1 / 8  # log2 k
_SIZE_PATIENCE = 3
_SIZE_TOL = 2.0**-10  # in log2 k: the fp16 scale's relative step


@dataclass(frozen=True)
class ClipSpec:
    method: str  # amax | pct | mse | sdclip | hsdclip | size
    percentile: float = 100.0
    norm: float = 2.4
    grid: int = 100
    maxshrink: float = 0.8
    k: tuple[tuple[str, float], ...] = ()  # explicit (role or "default", k), in ROLE_KEYS order then default
    lam: float = 0.0
    target_bpw: float | None = None

    def k_for(self, role: str | None, bits: int) -> float:
        """The SDClip k of a tensor of `role` at width `bits`: explicit, else the explicit default, else the
        records' (record_k)."""
        explicit = dict(self.k)
        if role in explicit:
            return explicit[role]
        if "default" in explicit:
            return explicit["default"]
        return record_k(role if role in RECORD_K else "default", bits)

    def k_by_role(self, bits: int) -> dict[str, float]:
        """k of every role at width `bits`, as the clip resolves it ({} for methods without k)."""
        if self.method not in ("sdclip", "hsdclip"):
            return {}
        return {role: self.k_for(role, bits) for role in ROLE_KEYS}

    def __str__(self) -> str:
        """Canonical text: parse_clip(str(spec)) == spec."""
        if self.method == "amax":
            return "amax"
        if self.method == "pct":
            return f"pct:{self.percentile!r}"
        if self.method == "mse":
            return f"mse:norm={self.norm!r},grid={self.grid},maxshrink={self.maxshrink!r}"
        if self.method == "size":
            return "size" if self.target_bpw is None else f"size:{self.target_bpw!r}"
        args = [f"{role}={k!r}" for role, k in self.k]
        if self.method == "hsdclip":
            args.append(f"lambda={self.lam!r}")
        return f"{self.method}:{','.join(args)}" if args else self.method


def record_k(role_key: str, bits: int) -> float:
    """The records' k for a key of RECORD_K at width `bits`: theirs at a width they used, else that of
    the nearest record width w (the narrower on a tie) times 2^(bits - w)."""
    by_width = RECORD_K[role_key]
    width = min(by_width, key=lambda w: (abs(w - bits), w))
    return by_width[width] * 2.0 ** (bits - width)


def parse_clip(text: str) -> ClipSpec:
    """Parse a clip spec (grammar in the module docstring); OptionError names the bad part and the fix."""
    method, _, rest = text.strip().partition(":")
    if method not in _KEYS:
        raise OptionError(f"clip {text!r}: unknown method {method!r}; use one of: {_EXAMPLES}")
    values = _parse_args(text, method, rest) if ":" in text else {}
    if method == "pct":
        if "p" not in values:
            raise OptionError(f"clip {text!r}: pct needs a percentile, e.g. pct:99.99984")
        if not 50.0 <= values["p"] <= 100.0:
            raise OptionError(f"clip {text!r}: P is a percentage in [50, 100] (pct:99.99984), not a fraction")
        return ClipSpec("pct", percentile=values["p"])
    if method == "mse":
        return _mse_spec(text, values)
    if method == "size":
        bpw = values.get("bpw")
        if bpw is not None and not 0.0 < bpw <= 8.0:
            raise OptionError(f"clip {text!r}: BPW is a code entropy in bits per weight, 0 < BPW <= 8")
        return ClipSpec("size", target_bpw=bpw)
    if method == "amax":
        return ClipSpec("amax")
    return _sdclip_spec(text, method, values)


def _parse_args(text: str, method: str, rest: str) -> dict[str, float]:
    positional, allowed = _POSITIONAL[method], _KEYS[method]
    values: dict[str, float] = {}
    seen_key = False
    for i, raw in enumerate(rest.split(",")):
        item = raw.strip()
        key, eq, val = item.partition("=")
        if eq:
            key, seen_key = key.strip(), True
            if key not in allowed:
                raise OptionError(f"clip {text!r}: {method} takes no key {key!r}; keys: {', '.join(allowed) or 'none'}")
        elif seen_key or i >= len(positional):
            raise OptionError(f"clip {text!r}: unexpected value {item!r}; {method} takes "
                              f"{len(positional)} positional value(s) before any key=value")
        else:
            key, val = positional[i], item
        if key in values:
            raise OptionError(f"clip {text!r}: {key} given twice")
        values[key] = _number(text, key, val)
    return values


def _number(text: str, key: str, val: str) -> float:
    try:
        x = float(val)
    except ValueError:
        raise OptionError(f"clip {text!r}: {key} must be a number, got {val.strip()!r}") from None
    if not math.isfinite(x):
        raise OptionError(f"clip {text!r}: {key} must be finite, got {val.strip()!r}")
    return x


def _mse_spec(text: str, values: dict[str, float]) -> ClipSpec:
    norm, grid, maxshrink = values.get("norm", 2.4), values.get("grid", 100.0), values.get("maxshrink", 0.8)
    if norm <= 0:
        raise OptionError(f"clip {text!r}: mse norm must be > 0 (2.4 is the reference)")
    if grid != int(grid) or grid < 1:
        raise OptionError(f"clip {text!r}: mse grid must be a positive integer (e.g. grid=100)")
    if not 0.0 <= maxshrink < 1.0:
        raise OptionError(f"clip {text!r}: mse maxshrink must be in [0, 1) (e.g. maxshrink=0.8)")
    return ClipSpec("mse", norm=norm, grid=int(grid), maxshrink=maxshrink)


def _sdclip_spec(text: str, method: str, values: dict[str, float]) -> ClipSpec:
    lam = values.pop("lambda", RECORD_LAMBDA)
    if not 0.0 <= lam <= 1.0:
        raise OptionError(f"clip {text!r}: lambda must be in [0, 1] (the record uses 0.175)")
    for key, k in values.items():
        if k <= 0:
            raise OptionError(f"clip {text!r}: {key} k must be > 0 (records use 11.5..20)")
    k = tuple((role, values[role]) for role in _K_KEYS if role in values)
    return ClipSpec(method, k=k, lam=lam if method == "hsdclip" else 0.0)


def round_codes(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """RTN codes at fixed fp16 row scales: clamp(round(w / s), -qmax, qmax) as int8 (w [..., rows, cols])."""
    r = qmax(bits)
    return torch.clamp(torch.round(w.float() / scales.float().unsqueeze(-1)), -r, r).to(torch.int8)


def entropy_bits(codes: torch.Tensor) -> float:
    """Order-0 empirical entropy of int8 codes, in bits per code (0.0 for an empty tensor)."""
    n = codes.numel()
    return order0_bits(codes.detach().cpu().numpy()) / n if n else 0.0


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), summed over slices of a bank; the squared Frobenius error without H."""
    e = w.float() - w_hat.float()
    if hessian is None:
        return float((e * e).sum(dtype=torch.float64))
    return float(((e @ hessian.float()) * e).sum(dtype=torch.float64))


def row_scales(w: torch.Tensor, bits: int, spec: ClipSpec, hessian: torch.Tensor | None = None,
               role: str | None = None) -> torch.Tensor:
    """fp16 scales, one per row of w [rows, cols] (or [S, rows] for a bank [S, rows, cols], with H [cols, cols]
    shared or [S, cols, cols] per slice)."""
    w = w.float()
    if w.dim() == 3:
        hs = [None] * w.shape[0] if hessian is None else (hessian if hessian.dim() == 3 else [hessian] * w.shape[0])
        return torch.stack([row_scales(ws, bits, spec, h, role) for ws, h in zip(w, hs)])
    if w.dim() != 2:
        raise ValueError(f"row_scales expects a 2-D or 3-D weight, got shape {tuple(w.shape)}")
    if spec.method == "mse":
        return _mse_scales(w, bits, spec)
    if spec.method == "size":
        return _size_scales(w, bits, spec, hessian)
    return fp16_scales(_clip(w, spec, hessian, role, bits) / qmax(bits))


def fp16_scales(s: torch.Tensor) -> torch.Tensor:
    return s.float().clamp(SCALE_MIN, SCALE_MAX).to(torch.float16)


def _clip(w: torch.Tensor, spec: ClipSpec, hessian: torch.Tensor | None, role: str | None,
          bits: int) -> torch.Tensor:
    a = w.abs()
    if spec.method == "amax":
        return a.amax(dim=-1)
    if spec.method == "pct":
        return _row_percentile(a, spec.percentile / 100.0)
    clip = spec.k_for(role, bits) * _row_std(w)
    if spec.method == "sdclip":
        return clip
    if hessian is None:
        raise OptionError("clip hsdclip needs the tensor's Hessian: calibrate, or use sdclip for tensors without one")
    d = torch.diagonal(hessian.float()).clamp_min(0)
    col_imp = d / d.mean() if d.mean() > 0 else torch.ones_like(d)
    imp = (a * col_imp).mean(dim=-1)
    rel = imp / imp.mean() if imp.mean() > 0 else torch.ones_like(imp)
    return clip * (1.0 + spec.lam * (rel - 1.0))


def _row_std(w: torch.Tensor) -> torch.Tensor:
    return w.std(dim=-1, correction=1 if w.shape[-1] > 1 else 0)


def _row_percentile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile per row (torch.quantile refuses inputs over 2^24 elements)."""
    srt = a.sort(dim=-1).values
    pos = q * (a.shape[-1] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, a.shape[-1] - 1)
    return srt[:, lo] + (pos - lo) * (srt[:, hi] - srt[:, lo])


def _mse_scales(w: torch.Tensor, bits: int, spec: ClipSpec) -> torch.Tensor:
    amax = w.abs().amax(dim=-1)
    best_s = fp16_scales(amax / qmax(bits))
    best_err = torch.full_like(amax, math.inf)
    for i in range(max(1, int(round(spec.maxshrink * spec.grid)))):
        s = fp16_scales((1.0 - i / spec.grid) * amax / qmax(bits))
        e = w - round_codes(w, s, bits).float() * s.float().unsqueeze(-1)
        err = e.abs().pow(spec.norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def _size_scales(w: torch.Tensor, bits: int, spec: ClipSpec, hessian: torch.Tensor | None) -> torch.Tensor:
    if spec.target_bpw is None:
        raise OptionError("clip size has no target: give size:BPW (bits per weight), or let the size allocator set it")
    sigma = _row_std(w) / qmax(bits)

    def candidate(log2k: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = fp16_scales(2.0**log2k * sigma)
        return s, round_codes(w, s, bits)

    def entropy(log2k: float) -> float:
        return entropy_bits(candidate(log2k)[1])

    lo, hi = _golden_max(entropy, *_SIZE_K_RANGE), _SIZE_K_RANGE[1]
    if entropy(hi) > spec.target_bpw:
        raise OptionError(f"clip size:{spec.target_bpw}: no clip reaches so few bits per weight at int{bits}; "
                          "raise the target or lower the bit width")
    if entropy(lo) <= spec.target_bpw:
        hi = lo
    while hi - lo > _SIZE_TOL:
        mid = 0.5 * (lo + hi)
        if entropy(mid) <= spec.target_bpw:
            hi = mid
        else:
            lo = mid
    best_s, best_err, misses, log2k = None, math.inf, 0, hi
    while log2k <= _SIZE_K_RANGE[1] and misses < _SIZE_PATIENCE:
        s, codes = candidate(log2k)
        log2k += _SIZE_SCAN_STEP
        if entropy_bits(codes) > spec.target_bpw:
            continue
        err = hessian_weighted_error(w, codes.float() * s.float().unsqueeze(-1), hessian)
        if err < best_err:
            best_s, best_err, misses = s, err, 0
        else:
            misses += 1
    return best_s


def _golden_max(f, lo: float, hi: float) -> float:
    """Argmax of a unimodal f on [lo, hi] to within _SIZE_TOL."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = f(a), f(b)
    while hi - lo > _SIZE_TOL:
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = f(b)
    return 0.5 * (lo + hi)
