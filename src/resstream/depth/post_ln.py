"""Post-LN: the norm after the residual addition (the original Transformer's placement).

Paper: "Attention Is All You Need", Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser,
Polosukhin (NeurIPS 2017, arXiv 1706.03762), section 3.1: the output of each sublayer is
LayerNorm(x + Sublayer(x)). For every sublayer s (attention, MLP, mixer sub-block):

    x_{s+1} = Norm(x_s + F_s(x_s))          the sublayer reads x_s itself, no pre-norm

Where the norms come from. Our decoder gives every sublayer one norm (its pre-norm) and the model
one final norm: one more than Post-LN's one norm per sublayer. Post-LN here uses each of them
once, shifted by one site: the norm in sublayer s's slot normalises the stream that sublayer s
receives, so it acts as the post-norm of sublayer s - 1, and the model's final norm is the
post-norm of the last sublayer. With u_s the value before the norm,

    x_s = Norm_s(u_{s-1})       u_{s} = x_s + F_s(x_s)       logits = head(Norm_final(u_last))

which unrolls to x_{s+1} = Norm_{s+1}(x_s + F_s(x_s)), Post-LN's recurrence. Compared with the
pre-norm baseline (u_s = u_{s-1} + F_s(Norm_s(u_{s-1}))) only the residual changes: it carries
the normalised value instead of the raw one. The first sublayer's norm normalises the embedding,
x_0 = Norm_0(embedding) (BERT's embedding LayerNorm; `embedding_norm=False` feeds the raw
embedding to the first sublayer, as the original Transformer does, and leaves that norm unused).
So the final norm is not an extra norm on top of Post-LN: it is the last post-norm, and the model
has exactly the baseline's parameters. Norm is the decoder's RMSNorm (learned gain, init 1)
rather than LayerNorm: the norm type is a model-wide choice, not the depth operator's.

starts_at_baseline is False: the residual carries normalised values, a different function from
the pre-norm model at any init.

`depth_layers`: an inactive block's sublayers use pre-norm standard addition (the residual
carries the raw stream); an active sublayer normalises whatever stream it receives.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from resstream.depth.base import DepthOperator
from resstream.registry import register_depth_operator


@dataclass
class PostNormState:
    stream: Tensor  # u: the value the next norm reads (normalised in place by an active read)


@register_depth_operator("post_ln")
class PostLN(DepthOperator):
    aggregates = "sum of sublayer outputs with the stream renormalised after every addition"
    mixing = "none"
    paper = ("Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, Polosukhin: Attention Is "
             "All You Need (NeurIPS 2017, arXiv 1706.03762)")
    starts_at_baseline = False  # the residual carries normalised values, see the module docstring

    @dataclass
    class Options:
        embedding_norm: bool = True  # the first sublayer's norm normalises the embedding

    @classmethod
    def option_metadata(cls, options) -> dict:
        # embedding_norm=False: the first sublayer reads the raw embedding (no norm)
        return {"reads_through_norm": options.embedding_norm}

    # the residual scale alpha of x_{s+1} = Norm(alpha x_s + F_s(x_s)); 1 for Post-LN
    def residual_scale(self) -> float:
        return 1.0

    def init_state(self, x0, ctx):
        return PostNormState(x0)

    def read(self, state, site, norm, ctx):
        if not self.is_active(site.layer):
            return norm(state.stream)  # pre-norm: the residual keeps the raw stream
        if site.index > 0 or self.options.embedding_norm:
            state.stream = norm(state.stream)  # the previous sublayer's post-norm
        return state.stream

    def write(self, state, site, out, ctx):
        alpha = self.residual_scale()
        if alpha == 1.0 or not self.is_active(site.layer):
            state.stream = state.stream + out
        else:
            state.stream = alpha * state.stream + out
        return state

    def finalize(self, state, ctx):
        return state.stream  # the model's final norm is the last sublayer's post-norm

    def forward_macs_per_token(self, seq_len):
        """0: as many norms as the baseline (each sublayer's and the final one, moved), and the
        residual additions are free."""
        return 0

    def no_weight_decay(self):
        """No parameters of its own (it uses the sublayers' and the final norms)."""
        return set()
