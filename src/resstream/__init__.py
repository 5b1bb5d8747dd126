"""resstream: the residual stream of a Transformer as a measurable design axis.

Depth-axis residual operators and sequence-axis local mixers behind one interface, composed by
name in one decoder (Transformer^2, arXiv 2603.16039)."""
from resstream.config import ModelConfig
from resstream.model import ResStreamLM
from resstream.registry import list_depth_operators, list_local_mixers

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ResStreamLM", "list_depth_operators", "list_local_mixers", "__version__"]
