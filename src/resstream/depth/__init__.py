"""Depth-axis residual operators, one file per method. Importing `resstream.registry`'s
DEPTH_OPERATORS loads every module of this package, so a new file registers itself."""
from resstream.depth.base import DepthOperator, QKVViews, Site

__all__ = ["DepthOperator", "QKVViews", "Site"]
