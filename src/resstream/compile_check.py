"""How well a model compiles: dynamo's graph breaks for the training forward and for a cached
decode step, on the tiny shapes of `resstream.testing.tiny_config`.

`torch._dynamo.explain` traces the call once (no code generation, a few seconds) and reports
every break: a break splits the model into several graphs, each compiled alone, with Python
running between them, which costs speed and stops `fullgraph=True`. The goal for every operator
and mixer is 0. `resstream operators --graph-breaks` prints these counts; tests/test_compile.py
holds every combination to them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from resstream.model import ResStreamLM
from resstream.testing import tiny_config


@dataclass
class GraphBreaks:
    count: int
    reasons: list[str]  # the first line of each distinct reason


def training_graph_breaks(depth: str, mixer: str | None = None, **options) -> GraphBreaks:
    """Breaks of the training forward (a [2, 10] batch, autograd on)."""
    model = ResStreamLM(tiny_config(depth=depth, local_mixer=mixer, n_layers=2, **options))
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    return _explain(model, ids)


def decode_graph_breaks(depth: str, mixer: str | None = None, **options) -> GraphBreaks:
    """Breaks of one cached decode step after a 5-token prefill (no autograd)."""
    model = ResStreamLM(tiny_config(depth=depth, local_mixer=mixer, n_layers=2, **options)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        return _explain(model, ids[:, 5:], cache=cache)


def _explain(model: ResStreamLM, *args, **kwargs) -> GraphBreaks:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args, **kwargs)
    reasons = sorted({str(b.reason).strip().splitlines()[0] for b in explained.break_reasons})
    return GraphBreaks(explained.graph_break_count, reasons)
