"""Routing weights of the depth operators: what each read takes from each earlier source.

`ResStreamLM.depth_routing(input_ids)` runs a no-grad forward with the operator's recorder on
(`DepthOperator.recording_routing`) and returns one of these dicts ("readers" are the reads
that mix depth, labelled by the sublayer or block they feed; "sources" by what they hold):

  {"kind": "none"}                                    standard, and operators without routing

  {"kind": "depth_attention",                         attnres, block_attnres, delta_attnres,
   "weights": Tensor[n_readers, n_sources],           depth_swa, elc_bert, vertical, mudd, dca
   "mean_max": Tensor[n_readers],
   "readers": [str], "sources": [str], "normalised": bool, "static": bool,
   ("per_head": Tensor[n_readers, n_heads, n_sources], "heads": [str])}
      weights[r, s]: the weight reader r gives source s, averaged over tokens (and over heads
      or ways: depth_swa's attention heads, MUDD's Q/K/V/R ways, DCA's Q/K/V reads; the
      unaveraged values are in per_head); NaN where r cannot see s. `normalised`: the rows
      are softmax distributions (sum to 1). mean_max[r]: the mean over tokens (and heads) of
      the largest weight of that token's row, taken per token before averaging (the contrast
      measure of Delta Attention Residuals, arXiv 2605.18855; 1 / visible sources = uniform).
      `static`: input-independent weights, read from the parameters.

  {"kind": "depth_weights", "weights", "readers", "sources", "normalised": False,
   "static": True}                                    denseformer: its alphas (unconstrained)

  {"kind": "ddl_beta", "beta": [Tensor[<= 4096]] per site, "mean": Tensor[n_sites],
   "sites": [str], "beta_init": float}               ddl: the gate beta in [0, 2] per token
      (evenly subsampled); near 0 identity, near 1 projection, near 2 reflection.

  {"kind": "stream_mixing", "matrices": Tensor[n_sites, n+1, n+1], "a_m": Tensor[n_sites, n],
   "a_r": Tensor[n_sites, n, n], "b": Tensor[n_sites, n], "sites": [str], "streams": n,
   "names": [str, str, str], "dynamic": bool}        hyper, mhc
      matrices = [[0, B], [A_m, A_r]] per site, the paper's HC matrix: A_m[j] reads stream j
      into the sublayer, A_r[j, i] is the weight of stream j in the new stream i, B[i] writes
      the output into stream i; averaged over tokens for dynamic HC. For mHC the three blocks
      are H_pre, H_res^T and H_post (`names`).

Labels: "emb" = the token embedding; "L3.attn" = sublayer attn of block 3 (0-based); "L3" =
block 3 (its output as a source, its input as a reader); "B2" = the second block of sublayers
of Block AttnRes / block Delta-AttnRes (sublayers S..2S-1); "final" = the read before the
final norm. `routing_to_json` / `routing_from_json` convert to and from JSON (NaN as null).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

KINDS = ("none", "depth_attention", "depth_weights", "ddl_beta", "stream_mixing")
MAX_BETA_VALUES = 4096  # beta values kept per DDL site
TENSOR_KEYS = ("weights", "mean_max", "per_head", "mean", "matrices", "a_m", "a_r", "b")
DDL_REGIMES = {"identity": 0.0, "projection": 1.0, "reflection": 2.0}


def site_label(site) -> str:
    return f"L{site.layer}.{site.kind}"


def token_maxima(weights: Tensor) -> Tensor:
    """The largest weight of each row (NaN = invisible source, ignored): [..., n] -> [...]."""
    return weights.nan_to_num(nan=-math.inf).amax(-1)


def mean_max_weight(per_token_weights: Tensor) -> Tensor:
    """The mean over tokens of each token's largest weight: [..., n_tokens, n_sources] ->
    [...] (e.g. [n_readers, n_tokens, n_sources] -> [n_readers]). The maxima are taken per
    token before averaging: the max of the averaged weights would hide sharp but varying
    routing. NaN entries (sources a reader cannot see) are ignored."""
    return token_maxima(per_token_weights).mean(-1)


@dataclass
class _ReadStats:
    sources: list[str]
    heads: list[str]
    weight_sum: Tensor  # [H, n] float64, summed over tokens
    max_sum: Tensor  # [H], sum over tokens of each token's largest weight
    count: int = 0


@dataclass
class RoutingRecorder:
    """What a depth operator records while `recording_routing()` is on, over any number of
    forwards: per-token weights of each read (summed, and their per-token maxima), per-token
    scalars (DDL's beta) and token-averaged matrices (HC)."""

    reads: dict = field(default_factory=dict)  # reader -> _ReadStats
    samples: dict = field(default_factory=dict)  # site -> [Tensor] per-token values
    matrices: dict = field(default_factory=dict)  # site -> [sum [a, b], count]

    def add_weights(self, reader: str, sources: list[str], weights: Tensor,
                    heads: list[str] | None = None) -> None:
        """weights [..., n_sources] (one row per token) or, with `heads`, [..., H, n_sources]."""
        w = weights.detach().to(torch.float64)
        w = w.reshape(-1, len(heads) if heads else 1, len(sources))
        stats = self.reads.get(reader)
        if stats is None:
            stats = _ReadStats(list(sources), list(heads or []), w.new_zeros(w.shape[1:]),
                               w.new_zeros(w.shape[1]))
            self.reads[reader] = stats
        stats.weight_sum += w.sum(0)
        stats.max_sum += token_maxima(w).sum(0)
        stats.count += w.shape[0]

    def add_samples(self, site: str, values: Tensor) -> None:
        self.samples.setdefault(site, []).append(values.detach().flatten().float().cpu())

    def add_mean(self, site: str, matrix: Tensor) -> None:
        """matrix [..., a, b] per token (or one [a, b] for all tokens), averaged over tokens."""
        m = matrix.detach().to(torch.float64)
        m = m.reshape(-1, *m.shape[-2:])
        entry = self.matrices.setdefault(site, [0.0, 0])
        entry[0] = entry[0] + m.sum(0)
        entry[1] += m.shape[0]


def _union(lists: list[list[str]]) -> list[str]:
    """Labels in order of first appearance (each reader's sources are in depth order)."""
    seen: dict[str, None] = {}
    for labels in lists:
        seen.update(dict.fromkeys(labels))
    return list(seen)


def depth_attention_result(recorder: RoutingRecorder, normalised: bool, static: bool = False,
                           kind: str = "depth_attention") -> dict:
    """The depth_attention (or depth_weights) dict from the recorded reads."""
    readers = list(recorder.reads)
    stats = [recorder.reads[r] for r in readers]
    sources = _union([s.sources for s in stats])
    weights = torch.full((len(readers), len(sources)), math.nan, dtype=torch.float64)
    mean_max = torch.empty(len(readers), dtype=torch.float64)
    heads = _union([s.heads for s in stats])
    per_head = torch.full((len(readers), len(heads), len(sources)), math.nan, dtype=torch.float64)
    for r, s in enumerate(stats):
        columns = [sources.index(label) for label in s.sources]
        mean = s.weight_sum / max(s.count, 1)  # [H, n]
        weights[r, columns] = mean.mean(0)
        mean_max[r] = (s.max_sum / max(s.count, 1)).mean()
        for h, label in enumerate(s.heads):
            per_head[r, heads.index(label), columns] = mean[h]
    result = {"kind": kind, "weights": weights.float(), "readers": readers, "sources": sources,
              "normalised": normalised, "static": static}
    if kind == "depth_attention":
        result["mean_max"] = mean_max.float()
    if heads:
        result["per_head"], result["heads"] = per_head.float(), heads
    return result


def static_weights_result(rows: list[tuple[str, list[str], Tensor]], normalised: bool,
                          kind: str = "depth_attention") -> dict:
    """depth_attention / depth_weights from input-independent weights: (reader, sources,
    weights [n]) per row (each row counts as one token, so mean_max is the row's max)."""
    recorder = RoutingRecorder()
    for reader, sources, weights in rows:
        recorder.add_weights(reader, sources, weights.unsqueeze(0))
    return depth_attention_result(recorder, normalised, static=True, kind=kind)


def ddl_beta_result(recorder: RoutingRecorder, beta_init: float,
                    max_values: int = MAX_BETA_VALUES) -> dict:
    """ddl_beta: each site's beta values, evenly subsampled to at most `max_values`."""
    sites = list(recorder.samples)
    betas, means = [], []
    for site in sites:
        values = torch.cat(recorder.samples[site])
        means.append(values.double().mean())
        if values.numel() > max_values:  # evenly spaced: covers every sequence and position
            values = values[torch.linspace(0, values.numel() - 1, max_values).long()]
        betas.append(values)
    mean = torch.stack(means).float() if means else torch.zeros(0)
    return {"kind": "ddl_beta", "beta": betas, "mean": mean, "sites": sites,
            "beta_init": float(beta_init)}


def stream_mixing_result(recorder: RoutingRecorder, n: int, dynamic: bool,
                         names: tuple[str, str, str] = ("A_m", "A_r", "B")) -> dict:
    """stream_mixing from token-averaged tables [n, n+2] (columns A_m | A_r | B) per site."""
    sites = list(recorder.matrices)
    tables = [total / count for total, count in (recorder.matrices[s] for s in sites)]
    table = torch.stack(tables).float() if tables else torch.zeros(0, n, n + 2)
    a_m, a_r, b = table[..., 0], table[..., 1:n + 1], table[..., n + 1]
    matrices = torch.zeros(len(sites), n + 1, n + 1)
    matrices[:, 0, 1:], matrices[:, 1:, 0], matrices[:, 1:, 1:] = b, a_m, a_r
    return {"kind": "stream_mixing", "matrices": matrices, "a_m": a_m, "a_r": a_r, "b": b,
            "sites": sites, "streams": n, "names": list(names), "dynamic": dynamic}


# ---------------------------------------------------------------------------- JSON

def _to_list(x: Tensor):
    values = x.tolist()
    return _map_nested(values, lambda v: None if isinstance(v, float) and math.isnan(v) else v)


def _map_nested(values, fn):
    if isinstance(values, list):
        return [_map_nested(v, fn) for v in values]
    return fn(values)


def _to_tensor(values) -> Tensor:
    return torch.tensor(_map_nested(values, lambda v: math.nan if v is None else float(v)),
                        dtype=torch.float32)


def routing_to_json(result: dict) -> dict:
    """A `depth_routing` result as plain JSON values (tensors as nested lists, NaN as null)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, Tensor):
            value = _to_list(value)
        elif key == "beta":
            value = [_to_list(v) for v in value]
        out[key] = value
    return out


def routing_from_json(data: dict) -> dict:
    """The inverse of `routing_to_json`: the same dict with its tensors back."""
    out = dict(data)
    for key in TENSOR_KEYS:
        if key in out and out[key] is not None:
            out[key] = _to_tensor(out[key])
    if "beta" in out:
        out["beta"] = [_to_tensor(v) for v in out["beta"]]
    return out
