"""Figures of the depth operators' routing weights (`ResStreamLM.depth_routing` results, or
their JSON form through `routing_from_json`), written as PNGs with matplotlib's Agg backend.

    plot_depth_attention(routing_by_variant, path)   heatmap per variant: reader x source
    plot_mean_max_weight(routing_by_variant, path)   mean max weight per read, uniform dashed
    plot_ddl_beta(routing, path)                     beta distribution per DDL site
    plot_stream_mixing(routing_by_variant, path)     HC / mHC matrices at the first, middle,
                                                     last sublayer

Each returns the path it wrote, or None when there is nothing of its kind to draw.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from resstream.routing import (DDL_REGIMES, TENSOR_KEYS, routing_from_json,  # noqa: F401
                               routing_to_json)

FONT = 9  # base font size (points) of every label
MAX_TICKS = 16  # beyond this many labels on an axis, label every k-th


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": FONT, "axes.titlesize": FONT + 1,
                         "axes.labelsize": FONT, "xtick.labelsize": FONT - 1,
                         "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1})
    return plt


def _as_result(routing: dict) -> dict:
    """A depth_routing dict with tensors (JSON forms are converted)."""
    as_json = any(isinstance(routing.get(key), list) for key in TENSOR_KEYS)
    as_json |= any(isinstance(beta, list) for beta in routing.get("beta", []))
    return routing_from_json(routing) if as_json else routing


def _ticks(axis_set, labels: list[str], rotate: bool = False) -> None:
    """Label every tick, or every k-th of many (a 25-source heatmap stays legible)."""
    step = max(1, math.ceil(len(labels) / MAX_TICKS))
    positions = list(range(0, len(labels), step))
    axis_set[0](positions)
    axis_set[1]([labels[i] for i in positions], rotation=90 if rotate else 0)


def _grid(plt, n: int, width: float, height: float, max_cols: int = 4):
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    # constrained layout: tick labels, titles and colour bars never overlap
    figure, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.6, height * rows + 0.6),
                                squeeze=False, layout="constrained")
    for axis in axes.flat[n:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:n])


def _save(figure, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130, bbox_inches="tight")  # tight: no label is clipped
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------- depth weights

def plot_depth_attention(routing_by_variant: dict[str, dict], path) -> Path | None:
    """One heatmap per variant (rows: reading sublayer/block, columns: source; NaN = cannot
    see, blank). Softmax-normalised variants share one colour scale from 0 (viridis);
    unnormalised ones (DenseFormer alphas, MUDD, DCA) share a diverging scale around 0, each
    group with its colour bar."""
    variants = {name: _as_result(r) for name, r in routing_by_variant.items()
                if r.get("kind") in ("depth_attention", "depth_weights")}
    if not variants:
        return None
    plt = _pyplot()
    figure, axes = _grid(plt, len(variants), 3.4, 3.1)
    groups = {True: [], False: []}  # normalised -> [(image, weights)]
    for axis, (name, result) in zip(axes, variants.items()):
        weights = result["weights"].float()
        normalised = bool(result.get("normalised", True))
        cmap = plt.get_cmap("viridis" if normalised else "RdBu_r").with_extremes(bad="white")
        image = axis.imshow(weights.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
        groups[normalised].append((image, weights))
        notes = [n for n, on in (("static", result.get("static")),
                                 ("unnormalised", not normalised)) if on]
        axis.set_title(name + (f" ({', '.join(notes)})" if notes else ""))
        _ticks((axis.set_xticks, axis.set_xticklabels), result["sources"], rotate=True)
        _ticks((axis.set_yticks, axis.set_yticklabels), result["readers"])
        axis.set_xlabel("source")
        axis.set_ylabel("reader")
    for normalised, members in groups.items():
        if not members:
            continue
        finite = torch.cat([w[torch.isfinite(w)] for _, w in members])
        if normalised:
            low, high = 0.0, max(float(finite.max()) if finite.numel() else 1.0, 1e-6)
        else:
            high = max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-6)
            low = -high
        for image, _ in members:
            image.set_clim(low, high)
        group_axes = [axis for axis, r in zip(axes, variants.values())
                      if bool(r.get("normalised", True)) == normalised]
        both = all(groups.values())  # two bars: one above the other
        bar = figure.colorbar(members[0][0], ax=group_axes, shrink=0.45 if both else 0.8,
                              aspect=25, anchor=(0.0, (0.95 if normalised else 0.05) if both else 0.5))
        bar.set_label("weight (softmax)" if normalised else "weight (unnormalised)")
    figure.suptitle("Depth routing: weight of each source per reading layer (token average)",
                    fontsize=FONT + 2)
    return _save(figure, plt, path)


def plot_mean_max_weight(routing_by_variant: dict[str, dict], path) -> Path | None:
    """Mean max weight per read, one line per softmax-normalised depth_attention variant
    (x: relative depth of the read, 0 = first, 1 = last), with that variant's uniform
    baseline 1 / (visible sources) dashed in the same colour. Unnormalised variants (MUDD,
    DCA) have no uniform baseline and are left out (named in the caption)."""
    variants = {name: _as_result(r) for name, r in routing_by_variant.items()
                if r.get("kind") == "depth_attention"}
    shown = {n: r for n, r in variants.items() if r.get("normalised", True) and "mean_max" in r}
    if not shown:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    colours = plt.get_cmap("tab10")
    for i, (name, result) in enumerate(shown.items()):
        mean_max = result["mean_max"].float()
        visible = torch.isfinite(result["weights"]).sum(-1).clamp(min=1).float()
        x = torch.linspace(0, 1, len(mean_max)) if len(mean_max) > 1 else torch.zeros(1)
        colour = colours(i % 10)
        axis.plot(x, mean_max, marker="o", markersize=3, color=colour, label=name)
        axis.plot(x, 1 / visible, linestyle="--", linewidth=1, color=colour, alpha=0.7)
    axis.plot([], [], linestyle="--", color="grey", label="uniform (1 / visible sources)")
    axis.set_xlabel("reading layer (relative depth: 0 = first read, 1 = last read / final)")
    axis.set_ylabel("mean over tokens of the max weight")
    axis.set_ylim(0, 1.05)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    left_out = [n for n in variants if n not in shown]
    title = "Routing contrast: mean max weight per read"
    if left_out:
        title += f"\n(unnormalised, not shown: {', '.join(left_out)})"
    axis.set_title(title)
    return _save(figure, plt, path)


# ---------------------------------------------------------------------------- DDL

def plot_ddl_beta(routing: dict, path, bins: int = 40) -> Path | None:
    """The distribution of beta over tokens at every DDL site, as mirrored histograms (a
    violin that a constant beta, as at init, cannot break), with the identity (0),
    projection (1) and reflection (2) regimes marked and each site's mean as a dot. Widths
    are sqrt(count / max count) per site, so that rare values stay visible."""
    routing = _as_result(routing)
    if routing.get("kind") != "ddl_beta" or not routing["beta"]:
        return None
    plt = _pyplot()
    sites = routing["sites"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(sites) + 2.5), 4.2))
    edges = torch.linspace(0, 2, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for i, beta in enumerate(routing["beta"]):
        counts = torch.histc(beta.float().clamp(0, 2), bins=bins, min=0, max=2)
        width = 0.42 * (counts / counts.max().clamp(min=1)).sqrt()  # sqrt: tails stay visible
        axis.fill_betweenx(centres, i - width, i + width, color="tab:blue", alpha=0.6, linewidth=0)
        axis.plot(i, float(beta.float().mean()), "o", color="black", markersize=3)
    for name, value in DDL_REGIMES.items():
        axis.axhline(value, color="tab:red", linestyle=":", linewidth=1)
        axis.text(len(sites) - 0.4, value, f" {name} ({value:g})", va="center",
                  color="tab:red", fontsize=FONT - 1)
    axis.axhline(routing.get("beta_init", 1.0), color="grey", linestyle="--", linewidth=0.8)
    axis.set_xlim(-0.6, len(sites) - 0.4)
    axis.set_ylim(-0.05, 2.05)
    _ticks((axis.set_xticks, axis.set_xticklabels), sites, rotate=True)
    axis.set_xlabel("site")
    axis.set_ylabel("beta")
    axis.set_title(f"DDL gate beta per site over tokens (dot: mean; dashed grey: init "
                   f"{routing.get('beta_init', 1.0):g})")
    return _save(figure, plt, path)


# ---------------------------------------------------------------------------- HC

def _chosen_sites(sites: list[str]) -> list[int]:
    """The first, middle and last site (fewer when there are fewer)."""
    return sorted({0, (len(sites) - 1) // 2, len(sites) - 1})


def plot_stream_mixing(routing_by_variant: dict[str, dict], path) -> Path | None:
    """Per variant (rows), the (n+1) x (n+1) HC matrix [[0, B], [A_m, A_r]] at the first,
    middle and last sublayer (columns), annotated, on one diverging colour scale. Row 0 is
    the sublayer output F, rows 1..n the streams H_j (from); column 0 the sublayer input,
    columns 1..n the new streams H'_i (to)."""
    variants = {name: _as_result(r) for name, r in routing_by_variant.items()
                if r.get("kind") == "stream_mixing" and r.get("sites")}
    if not variants:
        return None
    plt = _pyplot()
    n_cols = max(len(_chosen_sites(r["sites"])) for r in variants.values())
    figure, axes = plt.subplots(len(variants), n_cols, squeeze=False,
                                figsize=(3.0 * n_cols + 1.2, 2.9 * len(variants) + 0.6))
    high = max(float(r["matrices"].abs().max()) for r in variants.values())
    image = None
    for row, (name, result) in enumerate(variants.items()):
        n = int(result["streams"])
        names = result.get("names", ["A_m", "A_r", "B"])
        chosen = _chosen_sites(result["sites"])
        for col in range(n_cols):
            axis = axes[row][col]
            if col >= len(chosen):
                axis.set_visible(False)
                continue
            matrix = result["matrices"][chosen[col]].float()
            image = axis.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-high, vmax=high)
            if n <= 6:  # small matrices: the values themselves
                for (i, j), value in zip(torch.cartesian_prod(torch.arange(n + 1),
                                                              torch.arange(n + 1)).tolist(),
                                         matrix.flatten().tolist()):
                    axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=FONT - 2,
                              color="white" if abs(value) > 0.6 * high else "black")
            axis.set_xticks(range(n + 1))
            axis.set_xticklabels(["in"] + [f"H'{i}" for i in range(n)])
            axis.set_yticks(range(n + 1))
            axis.set_yticklabels(["F"] + [f"H{j}" for j in range(n)])
            axis.set_title(f"{name}: {result['sites'][chosen[col]]}")
            axis.set_xlabel("to")
            if col == 0:
                axis.set_ylabel("from")
    bar = figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
    bar.set_label("coefficient (token average)")
    figure.suptitle("Hyper-connection matrices [[0, B], [A_m, A_r]] at the first, middle and last "
                    "sublayer\nrow F: the write B (mHC: H_post); column 'in': the read A_m "
                    "(H_pre); "
                    "the rest: A_r (H_res^T), from stream H_j to new stream H'_i",
                    fontsize=FONT + 1)
    return _save(figure, plt, path)
