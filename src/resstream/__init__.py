"""resstream: the residual stream of a Transformer as a measurable design axis.

Depth-axis residual operators and sequence-axis local mixers behind one interface, composed by
name in one decoder (Transformer^2, arXiv 2603.16039)."""
from resstream.config import ModelConfig
from resstream.flops import flops_breakdown, training_flops_per_token
from resstream.model import ResStreamLM
from resstream.param_match import match_parameters
from resstream.registry import list_depth_operators, list_local_mixers

__version__ = "0.1.0"

__all__ = ["ModelConfig", "ResStreamLM", "flops_breakdown", "list_depth_operators", "list_local_mixers",
           "match_parameters", "training_flops_per_token", "__version__"]
