"""Kernels shared by both axes. `local_attention` is the one causal local-attention operator:
ShortSWA on the sequence axis and the depth-wise residual read on the depth axis."""
from resstream.ops.local_attention import BACKENDS, local_attention, local_attention_mask

__all__ = ["BACKENDS", "local_attention", "local_attention_mask"]
