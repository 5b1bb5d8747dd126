"""Deep Delta Learning (Zhang, Liu, Wang, Gu; arXiv 2601.00417).

The residual state of a token is X in R^{d x d_v} (d_v = 1: the ordinary vector). Around every
sublayer (Compress -> Process -> Rewrite):

    x_in = C(X)                          compressor; identity when d_v = 1
    c    = Norm(x_in)                    the sublayer's own pre-norm
    h    = F(c)                          attention / MLP / mixer output
    k    = h / sqrt(||h||^2 + eps_k^2)   unit direction taken from the sublayer output itself
    beta = 2 sigmoid(w_beta^T c + b_beta)            in (0, 2), computed in float32
    v    = W_v c + b_v  in R^{d_v}       target value along k (paper text)
    X'   = X + beta k (v^T - k^T X) = (I - beta k k^T) X + beta k v^T

The Delta operator A = I - beta k k^T has eigenvalues 1 (d-1 times) and 1 - beta: beta -> 0 is
the identity, beta = 1 makes the readout k^T X' equal v^T exactly (projection), beta = 2 is a
Householder reflection along k. Final readout: C_final(X) -> final norm -> LM head.

Expanded state (d_v > 1): X_0 = x_emb 1^T (plain repetition; the EC expander is an option) and
the CC compressor x_in[i] = sum_j c_ij X[i, j], c in R^{d x d_v} per site, initialised to
1/d_v (the mean over the channels; the paper's read vector at its init).

Defaults follow the paper's text (docs/design.md, decision 4); the released code's choices are
options:
- `init="paper"` (default): the initial values above and below (beta = beta_init exactly,
  W_v ~ N(0, init_std), b_v = 0, CC c = 1/d_v, TC per `compressor_init`), one compressor per
  site. `init="code"`: the parameters of the released code (yifanzhang-pro/deep-delta-learning,
  commit 2b55f25 of 2026-07-27: model/DDL-vdim1-gpt-mha-rope.py, DDL-gpt-mha-rope-CC-EC.py,
  DDL-gpt-mha-rope.py (TC), init_utils.py, whose `init_gpt_weights` re-draws every >= 2-D weight
  from N(0, 0.5/sqrt(d)) after the modules are built):
    * gate: w_beta ~ N(0, 0.5/sqrt(d)), b_beta = logit(beta_init / 2), so on the normalised c
      (|c| ~ sqrt(d)) the logit is about N(0, 0.5^2) and beta starts near 1 +- 0.25, per token;
      the "mlp" gate: W_1 and W_2 ~ N(0, 0.5/sqrt(d)) and no b_1 (the code's `beta_in` has none);
    * value head: W_v ~ N(0, 0.5/sqrt(d)), b_v ~ U(-1/sqrt(d), 1/sqrt(d)) (nn.Linear's default,
      which the re-draw leaves alone);
    * CC (d_v > 1): the code's parameterisation, a conv along the d_v axis with d_v taps
      w[i] ~ N(0, 0.5/sqrt(d)) per feature ("same" zero padding, left pad (d_v - 1) // 2) and
      a read vector r = 1/d_v: c_ij = sum_k r_k w[i, j - k + (d_v - 1) // 2]
      (`ChannelConvCompressor`), so the read starts as a random mix of the channels, not their
      mean; TC: the token taps ~ N(0, 0.5/sqrt(d)), r = 1/d_v;
    * one compressor per block, read by the block's attention and MLP sites (each keeps its own
      TC decode history), plus the final readout's; the EC expander stays identity (the code
      resets it after the re-draw);
    * weight decay (`weight_decay=True`) also on the gate weights and the compressor taps, as
      the code's optimizer decays every >= 2-D weight.
  A later revision of the code (after that snapshot) scales the draws by fan-in and fan-out
  (gate weight std 0.5/d, so beta starts at 1 +- 0.25/sqrt(d)) and keeps the compressors at
  constant averages (TC: taps 1/k, our `compressor_init="average"`); `init="code"` does not
  follow it. `value="code"` is a separate option (below); the code's own configs combine
  `init="code"`, `value="code"` and `beta_init=1`.
- `value="paper"`: v = W_v c.  `value="code"`: v = 4 sigmoid(W_v x_in + b_v) (bounded, from the
  un-normalised x_in).
- `beta_gate="linear"`: w_beta^T c + b_beta.  `beta_gate="mlp"`: W_2 tanh(W_1 c + b_1) + b_2,
  hidden 128.
- `beta_init`: b_beta = logit(beta_init / 2), w_beta = 0, so beta = beta_init exactly at step 0
  (`init="paper"`; `init="code"` draws w_beta, so beta starts near beta_init).
  The paper's text does not fix beta_0; its reported configs use 1.0, which we take as the
  default (the model then starts in the exact-overwrite regime along k, NOT at the standard
  residual). The code's module fallback (0.0, clamped to logit(1e-6)) is `beta_init=0`.
  starts_at_baseline is False: with beta_init = 1 every write replaces the state's component
  along k by v instead of adding h, and with beta_init = 0 the sublayers' outputs are not added
  at all; no beta gives the standard residual's x + h.
- k is the normalised sublayer output (App. A.1: no separate k-generator in the reported runs).

Token mixing (the only depth-operator parts that mix tokens, so the only ones with a decode
cache; k = `token_kernel` = 4 taps, causal, zero before the first token):
- `compressor="tc"` (TC): a depthwise causal conv over tokens on the flattened d*d_v channels,
  then the read vector r in R^{d_v} across d_v:
      x_in[t, i] = sum_j r_j sum_{m<k} w_m[i, j] X_{t-m}[i, j]
  one per site and one for the final readout, like CC (`init="code"`: one per block). Init
  (`compressor_init="mean"`): w_0 = 1, other taps 0, r = 1/d_v, so TC starts equal to the
  default CC compressor; `"average"`: every tap 1/k (the average over the last k tokens, the
  later code revision's init), r = 1/d_v; `init="code"`: random taps (above). TC also works
  with d_v = 1 (the code's vdim1-TC). Decode state: the last k-1 states X of each site,
  (k-1) d d_v values per site.
- `expander="ec"` (EC): X_0[t, i, j] = sum_{m<k} e_m[i, j] x_emb[t-m, i], a depthwise causal conv
  with channel multiplier d_v, identity-initialised (e_0 = 1, other taps 0: the current token
  copied into every channel, i.e. the plain repetition). Decode state: the last k-1
  embeddings, (k-1) d values (one per model).

Fast path (same results): with d_v = 1 the write works from h itself, x' = x + 2 sigmoid(z)
(v - k.x) / n h with n = sqrt(||h||^2 + eps_k^2) and z the gate logit, so k and beta are never
materialised; under autograd it is one hand-written node (`VectorDeltaWrite`, saving x and h
only), and the default gate and value heads share another (`LinearHeads`). Without autograd
(prefill, decode) the same arithmetic runs as about ten small ops per site.

`impl`: "fused" is that fast path; "naive" runs the equations above in plain autograd ops for
every d_v (`delta_update` on X [..., d, 1] for d_v = 1, the heads as ordinary linear layers);
"auto" (default) is fused, in eager mode and under torch.compile alike: the fused nodes trace
as one graph, compiled naive and fused measured equal (CPU, 1 thread), and fused was faster in
CUDA eager on an H200 (docs/benchmarks.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from resstream.depth.base import DepthOperator, cast, compute_dtype, use_naive, validate_impl
from resstream.mixers.shortconv import CausalDepthwiseConv
from resstream.options import require
from resstream.registry import register_depth_operator
from resstream.routing import ddl_beta_result, site_label

EPS_K = 1e-5


def delta_update(X: Tensor, k: Tensor, beta: Tensor, v: Tensor) -> Tensor:
    """X' = X + beta k (v^T - k^T X).  X [..., d, d_v], k [..., d] unit, beta [...], v [..., d_v]."""
    readout = torch.einsum("...d,...dv->...v", k, X)
    return X + beta[..., None, None] * k[..., :, None] * (v - readout)[..., None, :]


def unit_direction(h: Tensor, eps: float = EPS_K) -> Tensor:
    return h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + eps * eps)


# eps_k as 0-dim CPU tensors, one per dtype: `torch.hypot` needs a tensor, and a 0-dim CPU tensor
# of the input's dtype acts as a scalar on any device (a float64 one would cost a dtype-mixing
# path at every call).
_EPS_K_TENSORS: dict[torch.dtype, Tensor] = {}


def _eps_k(dtype: torch.dtype) -> Tensor:
    eps = _EPS_K_TENSORS.get(dtype)
    if eps is None:
        eps = _EPS_K_TENSORS[dtype] = torch.tensor(EPS_K, dtype=dtype)
    return eps


def vector_delta_write(x: Tensor, h: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """The whole d_v = 1 write from the raw sublayer output h and gate logit z, with k and beta
    never materialised:  n = sqrt(|h|^2 + eps_k^2), k = h / n, beta = 2 sigmoid(z),
    x' = x + beta (v - k.x) k = x + 2 [sigmoid(z) (v - k.x) / n] h.
    x, h [..., d]; z, v [..., 1]. Returns x' and the [..., 1] factors n, sigmoid(z), v - k.x and
    the coefficient on h over 2 (`VectorDeltaWrite` saves them)."""
    if x.dtype != h.dtype:  # (torch.promote_types is itself a dispatched op: skip it if equal)
        dtype = torch.promote_types(x.dtype, h.dtype)
        x, h = cast(x, dtype), cast(h, dtype)
    n = torch.hypot(torch.linalg.vector_norm(h, dim=-1, keepdim=True), _eps_k(h.dtype))
    error = torch.addcdiv(v, (h * x).sum(-1, keepdim=True), n, value=-1)  # v - k.x
    sig = torch.sigmoid(z)
    coef = error * sig / n  # beta (v - k.x) / (2 n); out of place: it is saved for backward
    return torch.addcmul(x, h, coef, value=2), n, sig, error, coef


class VectorDeltaWrite(torch.autograd.Function):
    """`vector_delta_write` with a hand-written backward: it saves x, h and five [..., 1] factors
    (autograd would save k, its norm terms and several [..., d] temporaries) and spends five
    passes over [..., d] tensors where autograd spends about fifteen. With g = dL/dx',
    m = beta (g.k) / n:
        dx = g - m h
        dh = (beta (v - k.x) / n) g - m x - m (v - 2 k.x) / n h
        dv = beta (g.k),  dz = (g.k) (v - k.x) beta (1 - sigmoid(z))."""

    @staticmethod
    def forward(ctx, x, h, z, v):
        out, n, sig, error, coef = vector_delta_write(x, h, z, v)
        ctx.save_for_backward(x, h, v, n, sig, error, coef)
        ctx.dtypes = z.dtype, v.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, v, n, sig, error, coef = ctx.saved_tensors
        z_dtype, v_dtype = ctx.dtypes
        hd, xd = cast(h, grad.dtype), cast(x, grad.dtype)
        grad_k = (grad * hd).sum(-1, keepdim=True).div_(n)  # g.k
        beta = 2 * sig
        grad_v = grad_k * beta
        grad_z = grad_k * error * beta * (1 - sig)  # d beta / dz = 2 sigmoid (1 - sigmoid)
        m = grad_v / n
        grad_x = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = cast(torch.addcmul(grad, hd, m, value=-1), x.dtype)
        if ctx.needs_input_grad[1]:
            grad_h = grad * (2 * coef)
            grad_h.addcmul_(xd, m, value=-1)
            grad_h.addcmul_(hd, m * (2 * error - v) / n, value=-1)  # 2 error - v = v - 2 k.x
            grad_h = cast(grad_h, h.dtype)
        return grad_x, grad_h, cast(grad_z, z_dtype), cast(grad_v, v_dtype)


class LinearHeads(torch.autograd.Function):
    """(F.linear(c, w1, b1), F.linear(c, w2, b2)): two small heads on one input c [..., d] (the
    gate logit and the value). The forward keeps the two matrix-vector products (one GEMM over
    the concatenated rows is slower on CPU); the backward computes dc with one GEMM over both
    heads' rows, where autograd runs a rank-1 GEMM per head and adds the two [..., d] results,
    and both weight gradients with one more."""

    @staticmethod
    def forward(ctx, c, w1, b1, w2, b2):
        ctx.save_for_backward(c, w1, w2)
        return F.linear(c, w1, b1), F.linear(c, w2, b2)

    @staticmethod
    def backward(ctx, grad1, grad2):
        c, w1, w2 = ctx.saved_tensors
        rows = w1.shape[0]
        grads = torch.cat([grad1, grad2], -1).flatten(0, -2)  # [N, rows of w1 + rows of w2]
        grad_c = (grads @ torch.cat([w1, w2])).view(c.shape)
        grad_w = grads.t() @ c.reshape(-1, c.shape[-1])
        grad_b = grads.sum(0)
        return grad_c, grad_w[:rows], grad_b[:rows], grad_w[rows:], grad_b[rows:]


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def code_std(d_model: int) -> float:
    """The released code's std for every >= 2-D DDL weight: 0.5 / sqrt(d) (`init="code"`)."""
    return 0.5 / math.sqrt(d_model)


class DeltaGate(nn.Module):
    """beta(c) = 2 sigmoid(gate(c)), float32. `init="paper"`: starts exactly at beta_init (the
    output weight is zero); `init="code"`: every weight N(0, 0.5/sqrt(d)) and no hidden bias in
    the "mlp" gate, so beta starts near beta_init and depends on c."""

    def __init__(self, d_model: int, beta_init: float, kind: str, init_std: float, init: str = "paper"):
        super().__init__()
        code = init == "code"
        std = code_std(d_model) if code else init_std
        if kind == "mlp":
            self.hidden = nn.Linear(d_model, 128, bias=not code)
            nn.init.normal_(self.hidden.weight, std=std)
            if self.hidden.bias is not None:
                nn.init.zeros_(self.hidden.bias)
            self.out = nn.Linear(128, 1)
        else:
            self.hidden = None
            self.out = nn.Linear(d_model, 1)
        if code:
            nn.init.normal_(self.out.weight, std=std)
        else:
            nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, _logit(beta_init / 2))

    def forward(self, c: Tensor) -> Tensor:
        return 2 * torch.sigmoid(self.logit(c)).squeeze(-1)

    def logit(self, c: Tensor) -> Tensor:
        """The gate's pre-activation [..., 1] (beta = 2 sigmoid of it), float32 or float64."""
        dtype = compute_dtype(c.dtype)  # never below fp32
        if c.dtype == dtype and not torch.is_autocast_enabled(c.device.type):
            return self._logit(c)  # the common case: no casts, no autocast context
        with torch.autocast(device_type=c.device.type, enabled=False):
            return self._logit(c.to(dtype))

    def _logit(self, c: Tensor) -> Tensor:
        x = c if self.hidden is None else torch.tanh(_linear(self.hidden, c))
        return _linear(self.out, x)


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) computed in x's dtype (the layer's parameters are cast, not converted)."""
    weight, bias = layer.weight, layer.bias
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


class ChannelCompressor(nn.Module):
    """CC: x_in[i] = sum_j c_ij X[i, j] (per-feature weights over the d_v channels), c = 1/d_v."""

    def __init__(self, d_model: int, value_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.full((d_model, value_dim), 1.0 / value_dim))

    def forward(self, X: Tensor) -> Tensor:
        return (X * self.weight).sum(-1)


class ChannelConvCompressor(nn.Module):
    """The released code's CC (`init="code"`): a depthwise conv along the d_v axis ("same"
    zero padding, left pad p = (d_v - 1) // 2, d_v taps w[i] per feature), then the read vector r:
        x_in[i] = sum_k r_k sum_m w[i, m] X[i, k + m - p]
    i.e. CC's c_ij = sum_k r_k w[i, j - k + p] (terms with j - k + p outside 0..d_v-1 vanish).
    Init: w ~ N(0, 0.5/sqrt(d)), r = 1/d_v."""

    def __init__(self, d_model: int, value_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_model, value_dim) * code_std(d_model))
        self.read = nn.Parameter(torch.full((value_dim,), 1.0 / value_dim))
        k = torch.arange(value_dim)
        tap = k[None, :] - k[:, None] + (value_dim - 1) // 2  # [k, j]: the tap index j - k + p
        self.register_buffer("tap", tap.clamp(0, value_dim - 1), persistent=False)
        self.register_buffer("valid", (tap >= 0) & (tap < value_dim), persistent=False)

    def channel_weights(self) -> Tensor:
        """c [d, d_v]: c_ij = sum_k r_k w[i, j - k + p] over the valid taps."""
        taps = self.weight[:, self.tap] * self.valid  # [d, k, j]
        return torch.einsum("dkj,k->dj", taps, self.read)

    def forward(self, X: Tensor) -> Tensor:
        return (X * self.channel_weights()).sum(-1)


class TokenConvCompressor(nn.Module):
    """TC: a causal conv over tokens on the d*d_v channels of X, then the read vector over d_v.
    `streams`: the decode histories kept, one per site that reads through it (`init="code"`
    shares one compressor between the sites of a block)."""

    def __init__(self, d_model: int, value_dim: int, kernel: int, init: str, streams: int = 1):
        super().__init__()
        self.value_dim = value_dim
        code = init == "code"
        self.conv = CausalDepthwiseConv(d_model * value_dim, kernel, bias=False, activation="none",
                                        init="small" if code else "identity",
                                        init_std=code_std(d_model), streams=streams)
        if init == "average":
            with torch.no_grad():
                self.conv.weight.fill_(1.0 / kernel)
        self.read = nn.Parameter(torch.full((value_dim,), 1.0 / value_dim))

    def forward(self, X: Tensor, ctx=None, stream: int = 0) -> Tensor:
        b, t = X.shape[:2]
        mixed = self.conv(X.reshape(b, t, -1), ctx, stream)  # channel i * d_v + j holds X[i, j]
        return (mixed.view(b, t, -1, self.value_dim) * self.read).sum(-1)


class ConvExpander(nn.Module):
    """EC: X_0[t, i, j] = sum_{m<k} e_m[i, j] x_emb[t-m, i], identity-initialised."""

    def __init__(self, d_model: int, value_dim: int, kernel: int):
        super().__init__()
        self.value_dim = value_dim
        self.conv = CausalDepthwiseConv(d_model, kernel, bias=False, activation="none",
                                        init="identity", multiplier=value_dim)

    def forward(self, x0: Tensor, ctx=None) -> Tensor:
        b, t, d = x0.shape
        X0 = self.conv(x0, ctx).view(b, t, d, self.value_dim)
        return X0 if self.value_dim > 1 else X0[..., 0]


def make_compressor(options, d_model: int, streams: int = 1) -> nn.Module:
    code = options.init == "code"
    if options.compressor == "tc":
        return TokenConvCompressor(d_model, options.value_dim, options.token_kernel,
                                   "code" if code else options.compressor_init, streams)
    if code:
        return ChannelConvCompressor(d_model, options.value_dim)
    return ChannelCompressor(d_model, options.value_dim)


@dataclass
class DDLState:
    X: Tensor  # [B, T, d] (d_v = 1) or [B, T, d, d_v]
    x_in: Tensor | None = None  # compressed read of the current site
    c: Tensor | None = None  # its normalised form (the sublayer input)
    plain_heads: bool = False  # gate and value are plain F.linear on c (`plain_heads`)
    naive: bool = False  # the naive path (`impl`)
    extra: dict = field(default_factory=dict)


@register_depth_operator("ddl")
class DeepDeltaLearning(DepthOperator):
    # the fused nodes trace as one graph; compiled, naive and fused measured equal (base.use_naive)
    naive_when_compiling = False
    aggregates = "rank-1 delta-rule rewrite of the current state along the sublayer output"
    mixing = "dynamic"
    paper = "Zhang, Liu, Wang, Gu, Deep Delta Learning (arXiv 2601.00417)"
    starts_at_baseline = False  # beta_init = 1 by default: exact overwrite along k

    @dataclass
    class Options:
        value_dim: int = 1  # d_v; 1 = scalar state, > 1 = expanded matrix state (paper: 4)
        beta_init: float = 1.0
        beta_gate: str = "linear"  # "linear" | "mlp"
        value: str = "paper"  # "paper" (v = W_v c) | "code" (v = 4 sigmoid(W_v x_in + b_v))
        compressor: str = "cc"  # "cc" (channel mixing; used when value_dim > 1) | "tc" (token conv)
        compressor_init: str = "mean"  # "mean" (1/d_v; TC: current token only) | "average" (TC: taps 1/k)
        expander: str = "none"  # "none" (repeat the embedding into every channel) | "ec" (conv)
        token_kernel: int = 4  # taps of the TC and EC convs over tokens
        init: str = "paper"  # "paper" | "code": the released code's weights and compressors (docstring)
        weight_decay: bool = True  # decay the randomly initialised matrices (False: none of DDL's)
        impl: str = "auto"  # "auto" | "fused" | "naive" (module docstring)

    @classmethod
    def validate_config(cls, config, options) -> None:
        require(options.value_dim >= 1, "depth_options.value_dim", options.value_dim, "an integer >= 1")
        require(0 <= options.beta_init <= 2, "depth_options.beta_init", options.beta_init, "0 <= beta_init <= 2")
        require(options.beta_gate in ("linear", "mlp"), "depth_options.beta_gate", options.beta_gate, "linear, mlp")
        require(options.value in ("paper", "code"), "depth_options.value", options.value, "paper, code")
        require(options.compressor in cls.compressor_choices(), "depth_options.compressor", options.compressor,
                ", ".join(cls.compressor_choices()))
        require(options.compressor_init in ("mean", "average"), "depth_options.compressor_init",
                options.compressor_init, "mean, average")
        require(options.compressor_init == "mean" or options.compressor == "tc",
                "depth_options.compressor_init", options.compressor_init,
                "mean (average is the TC compressor's token average; set compressor=tc)")
        require(options.init in ("paper", "code"), "depth_options.init", options.init, "paper, code")
        require(options.init == "paper" or options.compressor_init == "mean", "depth_options.compressor_init",
                options.compressor_init, "mean with init=code (the code draws the compressor's taps)")
        require(isinstance(options.weight_decay, bool), "depth_options.weight_decay", options.weight_decay,
                "true, false")
        require(options.expander in cls.expander_choices(), "depth_options.expander", options.expander,
                ", ".join(cls.expander_choices()))
        require(isinstance(options.token_kernel, int) and 1 <= options.token_kernel <= 64,
                "depth_options.token_kernel", options.token_kernel, "an integer in 1..64")
        validate_impl(options.impl)

    @classmethod
    def option_metadata(cls, options):
        return {"cross_token_state": options.compressor == "tc" or options.expander == "ec"}

    @classmethod
    def compressor_choices(cls) -> tuple[str, ...]:
        return ("cc", "tc")

    @classmethod
    def expander_choices(cls) -> tuple[str, ...]:
        return ("none", "ec")

    def __init__(self, config, sites, options):
        super().__init__(config, sites, options)
        d, dv = config.d_model, options.value_dim
        self.value_dim = dv
        self.active_sites = [s.index for s in sites if self.is_active(s.layer)]
        self.gates = nn.ModuleDict()
        self.values = nn.ModuleDict()
        self.compressors = nn.ModuleDict()
        code = options.init == "code"
        for index in self.active_sites:
            key = str(index)
            self.gates[key] = DeltaGate(d, options.beta_init, options.beta_gate, config.init_std, options.init)
            value = nn.Linear(d, dv)  # init "code": nn.Linear's default bias U(+-1/sqrt(d)) stays
            nn.init.normal_(value.weight, std=code_std(d) if code else config.init_std)
            if not code:
                nn.init.zeros_(value.bias)
            self.values[key] = value
        # the compressor each site reads through: its own ("paper"), or its block's ("code")
        self.compressor_keys = {s.index: f"layer{s.layer}" if code else str(s.index) for s in sites}
        # a site's decode history in its TC compressor: its place among the sites sharing it
        keys = list(self.compressor_keys.values())
        self.site_stream = {s.index: keys[:position].count(keys[position])
                            for position, s in enumerate(sites)}
        if dv > 1 or options.compressor == "tc":
            for key in dict.fromkeys(self.compressor_keys.values()):
                streams = sum(k == key for k in self.compressor_keys.values())
                self.compressors[key] = make_compressor(options, d, streams)
            self.compressors["final"] = make_compressor(options, d)
        self.expander = ConvExpander(d, dv, options.token_kernel) if options.expander == "ec" else None
        # the default heads (linear gate, value from c) can run as one `LinearHeads` node
        self.linear_heads = options.beta_gate == "linear" and options.value == "paper"

    # ---------------------------------------------------------------- hooks
    def init_state(self, x0, ctx):
        if self.expander is not None:
            X = self.expander(x0, ctx)
        elif self.value_dim == 1:
            X = x0
        else:
            X = x0[..., None].expand(*x0.shape, self.value_dim).contiguous()
        if use_naive(self.options.impl, self.naive_when_compiling):
            return DDLState(X, naive=True)
        return DDLState(X, plain_heads=self.plain_heads(x0))

    def plain_heads(self, x0: Tensor) -> bool:
        """Whether this forward's gate and value heads are plain F.linear calls on c: the default
        heads (linear gate, value from c), the stream in float32 (or float64) like their weights
        and no autocast, so the gate's float32 rule casts nothing. Decided once per forward
        rather than at every site (the checks cost about as much as a small op)."""
        if not self.linear_heads or not self.active_sites:
            return False
        weight = self.gates[str(self.active_sites[0])].out.weight
        return (x0.dtype in (torch.float32, torch.float64) and x0.dtype == weight.dtype
                and not torch.is_autocast_enabled(x0.device.type))

    def compress(self, X: Tensor, key: str, ctx=None, stream: int = 0) -> Tensor:
        if key not in self.compressors:  # d_v = 1 without TC: the state is the read
            return X
        compressor = self.compressors[key]
        return compressor(X, ctx, stream) if isinstance(compressor, TokenConvCompressor) else compressor(X)

    def read(self, state, site, norm, ctx):
        state.x_in = self.compress(state.X, self.compressor_keys[site.index], ctx, self.site_stream[site.index])
        state.c = norm(state.x_in)
        return state.c

    def write(self, state, site, out, ctx):
        if site.index not in self.active_sites:  # standard addition (into every channel)
            state.X = state.X + (out if self.value_dim == 1 else out[..., None])
        else:
            state.X = self.delta_write(state, str(site.index), out)
        state.x_in = state.c = None  # the site's reads are spent: carry only X to the next site
        return state

    def delta_write(self, state: DDLState, key: str, out: Tensor) -> Tensor:
        z, v = self.gate_and_value(key, state)
        if self._routing is not None:  # beta = 2 sigmoid(z), which the fused write never forms
            self._routing.add_samples(site_label(self.sites[int(key)]), 2 * torch.sigmoid(z))
        if self.value_dim > 1 or state.naive:  # X' = X + beta k (v^T - k^T X)
            beta = cast((2 * torch.sigmoid(z)).squeeze(-1), out.dtype)
            X = state.X if self.value_dim > 1 else state.X[..., None]
            X = delta_update(X, unit_direction(out), beta, v)
            return X if self.value_dim > 1 else X[..., 0]
        # vector state: the fused write (k and beta never materialised)
        if torch.is_grad_enabled():
            return VectorDeltaWrite.apply(state.X, out, z, v)
        return vector_delta_write(state.X, out, z, v)[0]  # inference and decode: nothing saved

    def gate_and_value(self, key: str, state: DDLState) -> tuple[Tensor, Tensor]:
        """The gate logit z [..., 1] (beta = 2 sigmoid(z)) and the value v [..., d_v] of a site."""
        gate, value, c = self.gates[key], self.values[key], state.c
        if state.plain_heads:
            heads = (gate.out.weight, gate.out.bias, value.weight, value.bias)
            if torch.is_grad_enabled():  # one autograd node for both heads
                return LinearHeads.apply(c, *heads)
            return F.linear(c, heads[0], heads[1]), F.linear(c, heads[2], heads[3])
        if self.options.value == "code":
            v = 4 * torch.sigmoid(value(state.x_in))
        else:
            v = value(c)
        return gate.logit(c), v

    def finalize(self, state, ctx):
        return self.compress(state.X, "final", ctx)

    # ---------------------------------------------------------------- routing weights
    def routing_result(self, recorder) -> dict:
        """ddl_beta: the gate beta per token at every active site (inactive sites add)."""
        return ddl_beta_result(recorder, self.options.beta_init)

    # ---------------------------------------------------------------- accounting
    def depth_state_vectors(self) -> int:
        return self.value_dim

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        return "d_v", self.value_dim

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Per active sublayer (d_v = value_dim): the gate logit, d (linear) or 128 d + 128
        (mlp); the value W_v, d d_v; k = h / |h|, 2d; the readout k^T X and the rank-1 rewrite
        beta k (v - k^T X)^T, 2 d d_v. Per read (every sublayer's and the final readout, when
        d_v > 1 or TC): CC d d_v; TC k d d_v (token conv) + d d_v (read vector); a compressor
        shared by a block's sites (`init="code"`) is applied at each of them. The EC expander:
        k d d_v once. Inactive sublayers add (free)."""
        d, dv, options = self.d_model, self.value_dim, self.options
        gate = d if options.beta_gate == "linear" else 128 * d + 128
        total = len(self.active_sites) * (gate + d * dv + 2 * d + 2 * d * dv)
        taps = options.token_kernel
        per_compressor = (taps + 1) * d * dv if options.compressor == "tc" else d * dv
        total += (len(self.sites) + 1 if self.compressors else 0) * per_compressor
        if self.expander is not None:
            total += taps * d * dv
        return total

    def no_weight_decay(self) -> set[str]:
        """With `weight_decay` (default), the randomly initialised matrices are decayed, as the
        released nanoGPT-style code decays its >= 2-D weights: the value heads' W_v and, with
        `init="code"`, also the gate weights and the compressors' conv taps. Never decayed: the
        `init="paper"` gates (w_beta = 0, b_beta = logit(beta_0 / 2); the "mlp" gate's hidden
        layer is part of the gate), the constant-initialised compressors (CC weights 1/d_v, TC
        taps, read vectors), the EC expander (identity taps) and all biases. Without
        `weight_decay` no DDL parameter is decayed."""
        decayed = ("values.",) + (("gates.", "compressors.") if self.options.init == "code" else ())
        return {name for name, param in self.named_parameters()
                if not (self.options.weight_decay and param.dim() >= 2 and name.startswith(decayed))}
