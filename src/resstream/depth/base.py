"""The interface every depth-axis residual operator implements.

A depth operator owns the residual stream of each token across depth. The decoder calls it
around every sublayer *site* (attention, MLP, and the ShortSWA sub-block when present):

    state = op.init_state(x0, ctx)                 # after the token embedding
    for each site s, in order:
        x = op.read(state, s, sublayer.norm, ctx)  # the sublayer's (normalised) input
        y = sublayer(x, ctx)                       # attention / MLP / local mixer output
        state = op.write(state, s, y, ctx)         # how the output enters the stream
    h = op.finalize(state, ctx)                    # fed to the final norm and the LM head

`read` returns the input already passed through the sublayer's pre-norm (operators that give
attention separate query/key/value inputs return a `QKVViews`; an operator whose paper reads
without it declares `reads_through_norm` False). An operator that acts inside
attention on its value vectors (the value residual) sets `transforms_values`; the decoder then
lets each global-attention sublayer pass its values through `op.attention_values(state, s, v)`
(model.run_site). An operator whose method prescribes an init of the sublayers' own weights
(DeepNet's beta) applies it in `init_sublayers`, which the model calls once after building its
blocks. Operators acting once per block (ELC-BERT, DenseFormer, MUDD, DCA, Vertical,
depth_swa) do their work at `site.first` / `site.last`; the others (AttnRes, HC, DDL) at every
site. Everything here is position-wise over
depth: no operator mixes tokens, except those that declare `cross_token_state`.

`depth_layers` in the config limits an operator to a subset of blocks; elsewhere the operator
behaves as standard addition (operators decide what that means for their state and say so).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from resstream.options import NoOptions, require
from resstream.routing import RoutingRecorder

SITE_KINDS = ("mix", "attn", "mlp")
# the operator metadata declared as class attributes (DepthOperator); option-dependent values
# come from `option_metadata`
METADATA = ("aggregates", "mixing", "paper", "source_note", "starts_at_baseline",
            "uses_depth_window", "cross_token_state", "granularity", "reads_through_norm",
            "transforms_values")


@dataclass(frozen=True)
class Site:
    """One sublayer position in the decoder: global index over all sublayers, its block, kind."""

    index: int
    layer: int
    kind: str
    first: bool  # first sublayer of its block
    last: bool  # last sublayer of its block


class QKVViews(NamedTuple):
    """Separate (already normalised) inputs for attention's query, key and value projections."""

    q: Tensor
    k: Tensor
    v: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Depth-mixing arithmetic (weights, logits, stream mixes) runs in float32, or float64 for a
    float64 model, whatever the stream's dtype (a plain comparison: torch.promote_types is a
    dispatched call, and this runs at every site)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in `dtype`, without any dispatched call when it already is."""
    return x if x.dtype == dtype else x.to(dtype)


IMPLS = ("auto", "fused", "naive")


def validate_impl(impl: str) -> None:
    """The `impl` option of operators with a hand-written (fused) path beside a naive one."""
    require(impl in IMPLS, "depth_options.impl", impl, ", ".join(IMPLS))


def use_naive(impl: str, when_compiling: bool = True) -> bool:
    """Whether a forward takes the naive path: impl "naive", or "auto" under torch.compile for
    an operator whose naive path compiles faster (`DepthOperator.naive_when_compiling`).

    The fused paths are hand-written autograd nodes (and buffer tricks) that make CPU eager
    training fast. Under torch.compile some of them break the graph (AttnRes's phase schedule,
    MUDD's storage aliasing): there inductor gets the naive path's plain ops and fuses them
    itself. Others trace as one graph and stay faster compiled (measured on CPU, 1 thread:
    compiled naive / compiled fused = 1.17x for hyper, 1.31x for mhc, 0.99x for ddl), so their
    "auto" stays fused. "auto" keeps fused in eager mode on every device (CUDA eager, measured
    on an H200: fused faster for hyper, mhc, ddl; docs/benchmarks.md)."""
    return impl == "naive" or (impl == "auto" and when_compiling
                               and torch.compiler.is_compiling())


def is_decode_step(x: Tensor) -> bool:
    """True for one new token per sequence ([B, 1, d]) with autograd off: a cached decode step.

    Such a step on a small batch is bound by per-op overhead, not by memory traffic, so
    operators may take a path with fewer (and smaller) ops there than the path built for
    training on [B, T, d]. Never while torch.compile traces (see below). The decode-parity tests (prefill with the general path, then
    token-by-token steps with this one, against a full forward) check that both agree.
    """
    # Under torch.compile the general path is taken: the compiler removes the per-op overhead
    # this path exists for, and the workspace's bookkeeping (checks of weight versions and of
    # inference mode) would break the graph.
    return x.shape[1] == 1 and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class DecodeWorkspace:
    """Base of a depth operator's decode-cache entry: tensors derived from the weights and
    scratch buffers that every decode step reuses instead of rebuilding (at batch 1 a step is
    bound by per-op overhead). Nothing here is token history, so `tensors()` is empty.

    It is built from the weights at the first decode step. The weights are taken as fixed
    while a sequence decodes, as the KV cache takes them: they are checked again (storage and
    version counter of each of `weights(op)`) at the start of every sequence, i.e. at a decode
    step at offset 0 or the first decode step after a multi-token forward with the cache
    (`new_sequence`), and the workspace is rebuilt if one was replaced or updated in place.
    Checking at every step would cost more than a read (it touches every weight). In-place
    writes through `.data` bypass the version counter and are not seen."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._source: tuple | None = None
        self._inference = False  # whether the workspace was built under inference_mode
        self._checked = False

    def weights(self, op: "DepthOperator") -> list[Tensor]:
        raise NotImplementedError

    def build(self, op: "DepthOperator", like: Tensor) -> None:
        """(Re)build everything derived from the weights, for steps like `like` [B, 1, d]."""
        raise NotImplementedError

    def prepare(self, op: "DepthOperator", like: Tensor, offset: int) -> None:
        """Make the workspace current for a decode step at position `offset`."""
        # tensors made under inference_mode cannot be updated in place outside it: rebuild
        inference = torch.is_inference_mode_enabled()
        if self._checked and offset and inference == self._inference:
            return
        source = (like.dtype, like.device, like.shape[-1], inference,
                  *((p.data_ptr(), p._version) for p in self.weights(op)))
        if source != self._source:
            self.build(op, like)
            self._source, self._inference = source, inference
        self._checked = True

    def new_sequence(self) -> None:
        """A multi-token forward used the cache: check the weights at the next decode step."""
        self._checked = False

    def tensors(self) -> list[Tensor]:
        return []


def decode_workspace(op: "DepthOperator", x0: Tensor, ctx) -> Any:
    """The operator's workspace from the decode cache, prepared for this step; a fresh one when
    the step runs without a cache."""
    if ctx is None or ctx.cache is None:
        workspace = op.new_cache_entry(x0.shape[0], 1, x0.device, x0.dtype)
        workspace.prepare(op, x0, 0)
        return workspace
    workspace = ctx.entry(op)
    workspace.prepare(op, x0, ctx.cache.length)
    return workspace


def add_to_stream_and_views(state: Any, site: Site, out: Tensor) -> None:
    """Standard addition for operators whose block reads give attention separate Q/K/V views
    (`state.views` [B, T, 3, d], or None) beside the residual stream `state.stream`: the
    output joins the stream; a mixer sub-block's output also joins every view, so that
    S = H + ShortSWA(Norm(H)) holds per view (Algorithm 1); the views are spent once attention
    has read them."""
    state.stream = state.stream + out
    if site.kind == "mix" and state.views is not None:
        state.views = state.views + out[:, :, None]
    if site.kind == "attn":
        state.views = None


def flatten_state(state: Any, skip: frozenset[str] = frozenset()) -> tuple[list[Tensor], Any]:
    """(tensors, rebuild): every distinct tensor of a depth state (by identity: aliases once),
    in a fixed walk order, and `rebuild(tensors)`, which makes a new state of the same
    structure around other tensors. The walk enters tensors, dataclasses (fields named in
    `skip` become None), lists, tuples and dicts; any other value is kept as it is."""
    tensors: list[Tensor] = []
    slots: dict[int, int] = {}

    def walk(value):  # -> a function of the new tensors giving the new value
        if isinstance(value, Tensor):
            slot = slots.setdefault(id(value), len(tensors))
            if slot == len(tensors):
                tensors.append(value)
            return lambda new: new[slot]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            parts = {f.name: (lambda new: None) if f.name in skip else walk(getattr(value, f.name))
                     for f in dataclasses.fields(value) if f.init}
            kind = type(value)
            return lambda new: kind(**{name: part(new) for name, part in parts.items()})
        if isinstance(value, (list, tuple)):
            items, kind = [walk(item) for item in value], type(value)
            if hasattr(value, "_fields"):  # a NamedTuple
                return lambda new: kind(*(item(new) for item in items))
            return lambda new: kind(item(new) for item in items)
        if isinstance(value, dict):
            entries = {key: walk(item) for key, item in value.items()}
            return lambda new: {key: entry(new) for key, entry in entries.items()}
        return lambda new: value

    return tensors, walk(state)


def build_sites(n_layers: int, kinds_per_block: tuple[str, ...]) -> list[Site]:
    sites = []
    for layer in range(n_layers):
        for position, kind in enumerate(kinds_per_block):
            sites.append(Site(len(sites), layer, kind, position == 0,
                              position == len(kinds_per_block) - 1))
    return sites


class DepthOperator(nn.Module):
    """Base class. Subclasses register with `@register_depth_operator("name")`."""

    name: ClassVar[str] = "?"
    Options: ClassVar[type] = NoOptions
    # Metadata (`METADATA`; read by `resstream operators` and the contract tests): plain class
    # attributes, declared one way. A value that depends on the options is not a property: the
    # class keeps its default here and `option_metadata(options)` returns the value for given
    # options; `metadata(options)` merges both, and every instance carries its own values.
    aggregates: ClassVar[str] = ""
    mixing: ClassVar[str] = "none"  # "none" | "static" | "dynamic"
    paper: ClassVar[str] = ""
    # a caveat about the source, printed under the table (e.g. a form not read from the paper)
    source_note: ClassVar[str] = ""
    # at init the model equals `standard` on shared weights (up to the norms' eps where the
    # module docstring says so); an operator that may not says why in its module docstring,
    # in a sentence naming `starts_at_baseline`
    starts_at_baseline: ClassVar[bool] = True
    uses_depth_window: ClassVar[bool] = False
    cross_token_state: ClassVar[bool] = False
    granularity: ClassVar[str] = "sublayer"  # "sublayer" | "block"
    # with impl="auto": whether torch.compile gets the naive path (see `use_naive`)
    naive_when_compiling: ClassVar[bool] = True
    # every read passes the stream through the sublayer's norm (False only where the paper
    # reads without one, said in the module docstring)
    reads_through_norm: ClassVar[bool] = True

    def __init__(self, config, sites: list[Site], options: Any):
        super().__init__()
        self.config = config
        self.sites = sites
        self.options = options
        for key, value in self.option_metadata(options).items():
            setattr(self, key, value)  # this instance's values (see `metadata`)
        self.d_model = config.d_model
        self.n_layers = config.n_layers
        active = config.depth_layers
        self.active_layers = frozenset(range(config.n_layers) if active is None else active)

    @classmethod
    def option_metadata(cls, options: Any) -> dict[str, Any]:
        """The metadata values (keys of `METADATA`) that depend on the options, for `options`;
        default: none (every value is the class attribute). Returns the same keys whatever
        the option values."""
        return {}

    @classmethod
    def metadata(cls, options: Any = None) -> dict[str, Any]:
        """Every `METADATA` value of this operator with `options` (None: the defaults)."""
        values = {key: getattr(cls, key) for key in METADATA}
        extra = cls.option_metadata(cls.Options() if options is None else options)
        unknown = sorted(set(extra) - set(METADATA))
        if unknown:
            raise RuntimeError(f"depth operator {cls.name!r}: option_metadata returns "
                               f"{', '.join(unknown)}; allowed: {', '.join(METADATA)}")
        values.update(extra)
        return values

    @classmethod
    def validate_config(cls, config, options: Any) -> None:
        """Raise UserError for combinations this operator cannot serve (default: accept all)."""

    def is_active(self, layer: int) -> bool:
        return layer in self.active_layers

    # ---------------------------------------------------------------- the four hooks
    def init_state(self, x0: Tensor, ctx) -> Any:
        raise NotImplementedError

    def read(self, state: Any, site: Site, norm: nn.Module, ctx) -> Tensor | QKVViews:
        raise NotImplementedError

    def write(self, state: Any, site: Site, out: Tensor, ctx) -> Any:
        raise NotImplementedError

    def finalize(self, state: Any, ctx) -> Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- sublayer init
    def init_sublayers(self, blocks: nn.ModuleList) -> None:
        """Called once by the model after it has built and initialised every block (and before
        any weights are loaded): an operator whose method prescribes an init of the sublayers'
        own weights applies it here, in place (DeepNet's beta scaling, LayerNorm Scaling
        without the scaled init of the output projections). Default: nothing."""

    # ---------------------------------------------------------------- attention values
    # An operator that acts on global attention's value vectors (ResFormer's value residual)
    # sets `transforms_values`: the decoder then passes each attention sublayer the function
    # `attention_values` bound to the state and site (model.run_site), which attention applies
    # to its values after the projection, before it splits them into heads and caches them (so
    # the KV cache holds the transformed values and a decode step needs only its own tokens').
    transforms_values: ClassVar[bool] = False

    def attention_values(self, state: Any, site: Site, v: Tensor, ctx) -> Tensor:
        """Attention's values at `site`, [B, T, n_kv_heads * head_dim]; default unchanged."""
        return v

    # ---------------------------------------------------------------- routing weights
    # A RoutingRecorder while `recording_routing()` is on. Operators with routing record the
    # weights their general (training/prefill) path computes behind one `if self._routing is
    # not None` check, recomputed from the same logits where the fused kernels hide them.
    _routing: RoutingRecorder | None = None

    @contextlib.contextmanager
    def recording_routing(self):
        """`with op.recording_routing() as recorder: model(ids)`; then `routing_result(recorder)`.
        Decode steps (one token, no grad) take fast paths that do not record."""
        self._routing = RoutingRecorder()
        try:
            yield self._routing
        finally:
            self._routing = None

    def routing_result(self, recorder: RoutingRecorder) -> dict:
        """The recorded routing weights as a dict (formats: resstream.routing); "none" here."""
        return {"kind": "none"}

    # ---------------------------------------------------------------- systems accounting
    def depth_state_vectors(self) -> int:
        """Peak number of d-vectors per token alive across depth inside one forward."""
        return 1

    def depth_state_values(self) -> int:
        """Values per token that the decode path keeps across depth: the d-vectors, plus any
        per-token scalars its implementation carries beside them (`resstream bench decode`
        compares this with the measured state)."""
        return self.depth_state_vectors() * self.d_model

    def pipeline_payload(self, layer: int) -> tuple[str, int]:
        """(formula, value): d-vectors per token that must cross a pipeline-stage boundary
        placed after block `layer` (0-based): what `stage_state(state, layer)` sends, counted
        as its elements per token over d (tests/test_pipeline.py measures it at the send)."""
        return "1", 1

    # ---------------------------------------------------------------- pipeline stages
    # A pipeline split after block `layer` sends the operator's state to the next stage as a
    # tuple of tensors (torch.distributed.pipelining sends tensors only, between adjacent
    # stages). The default flattens the state generically: a tensor, or a dataclass whose
    # fields are tensors, lists / dicts of them, None or plain values; every distinct tensor
    # (aliases sent once) except the fields `stage_transient(layer)` names, which the next
    # read recomputes. The receiving stage rebuilds the state's structure by running this
    # operator's own hooks on a two-token dummy through the blocks before the boundary (once
    # per boundary and dtype) and puts the received tensors in place of the dummy's.
    # Every stage tensor has the batch and token axes first ([B, T, ...]; [B*T, ...] after the
    # first is allowed) and counts its elements per token: `pipeline_payload` is that over d.

    def stage_transient(self, layer: int) -> frozenset[str]:
        """State fields not sent across a boundary after block `layer` (the receiver gets
        None there): scratch of the last sublayer or values the next read recomputes."""
        return frozenset()

    def stage_state(self, state: Any, layer: int) -> tuple[Tensor, ...]:
        """The tensors that cross a pipeline-stage boundary placed after block `layer`."""
        tensors, _ = flatten_state(state, self.stage_transient(layer))
        return tuple(tensors)

    def from_stage_state(self, tensors: tuple[Tensor, ...], layer: int) -> Any:
        """The state rebuilt on the stage after the boundary from `stage_state`'s tensors."""
        like = tensors[0]
        key = (layer, like.dtype, like.device, torch.is_autocast_enabled(like.device.type))
        skeletons = self.__dict__.setdefault("_stage_skeletons", {})
        if key not in skeletons:
            skeletons[key] = self._dummy_skeleton(layer, like)
        tensor_count, rebuild = skeletons[key]
        if len(tensors) != tensor_count:
            raise RuntimeError(f"depth operator {self.name!r} received {len(tensors)} stage "
                               f"tensors after block {layer}; its state holds {tensor_count}")
        return rebuild(tensors)

    def _dummy_skeleton(self, layer: int, like: Tensor):
        """(tensor count, rebuild) of the state after block `layer`, from a dummy forward of
        this operator alone: two tokens (not a decode step), identity norms, zero sublayers."""
        from resstream.cache import ForwardContext  # (resstream.cache does not import us)

        shape = (1, 2, self.d_model)
        ctx = ForwardContext(torch.arange(2, device=like.device))
        generator = torch.Generator().manual_seed(0)
        x0 = torch.randn(shape, generator=generator).to(like.device, like.dtype)
        identity = nn.Identity()
        with torch.no_grad():
            state = self.init_state(x0, ctx)
            kv_width = self.config.kv_heads * self.config.head_dim
            for site in self.sites:
                if site.layer > layer:
                    break
                self.read(state, site, identity, ctx)
                if self.transforms_values and site.kind == "attn":
                    self.attention_values(state, site, x0.new_zeros(*shape[:2], kv_width), ctx)
                state = self.write(state, site, torch.zeros_like(x0), ctx)
            tensors, rebuild = flatten_state(state, self.stage_transient(layer))
        return len(tensors), rebuild

    def forward_macs_per_token(self, seq_len: int) -> int:
        """Forward multiply-adds (MACs) per token of the depth mixing itself, for the whole model:
        everything this operator computes beyond the baseline's sublayers, pre-norms and
        residual additions (those belong to the model and are counted in resstream.flops).

        Conventions (shared by every operator, see resstream.flops): a weighted sum of m vectors
        of width d costs m d MACs, a [a x b] matrix-vector product a b; plain additions of
        vectors (residual adds, running sums) are free, as in `standard`; an RMSNorm the
        operator adds costs 2 MACs per element (sum of squares and rescale: depth mixing is
        mostly such vector passes, so they are counted); softmax, exp, sigmoid, tanh and other
        pointwise functions are free. Counted from the equations, not from how the
        implementation schedules them. `seq_len` matters only to operators that mix tokens.

        Every operator must declare it: a registry-parametrised test fails on this default."""
        raise NotImplementedError(f"depth operator {self.name!r} does not declare forward_macs_per_token")

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this operator) of its parameters that take no weight decay.

        Default: all of them. A depth operator's parameters are its residual path -- mixing
        coefficients, gates, pseudo-queries, stream matrices, priors, almost all initialised at
        an identity, a one-hot or a constant so that the model starts at (or near) the standard
        residual -- and weight decay would pull them toward zero, away from that start.
        Operators with ordinary content matrices (depth_swa's attention projections, DDL's
        value heads) override this and let those be decayed like attention weights. 1-D
        parameters are never decayed whatever this returns (ResStreamLM.parameter_groups)."""
        return {name for name, _ in self.named_parameters()}
