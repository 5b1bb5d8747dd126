"""The study report: `report.md` and its figures, written from `results.json` alone, so that
`resstream report DIR` reproduces them byte for byte without training.

Figures (PNG, under figures/):
* bpb_curves.png     validation bpb per variant against training tokens and against training
                     time, mean over seeds with a band from the lowest to the highest seed;
* final_bpb.png      paired difference to the baseline per variant with its 95% CI;
* the routing figures of `resstream.report_figures` for variants that route.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from resstream.errors import UserError

FIGURES_DIR = "figures"
REPORT_FILE = "report.md"


def write_report(out: Path, results: dict) -> Path:
    """Write report.md and every figure of `results` into `out`; returns report.md's path."""
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(results, figures / "bpb_curves.png"),
               plot_differences(results, figures / "final_bpb.png")]
    written += plot_routing(results, figures)
    text = report_markdown(results, [p.name for p in written if p is not None])
    path = out / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    return path


def read_results(out: Path) -> dict:
    from resstream.compare.runner import RESULTS_FILE

    path = out / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"report: {str(path)!r} does not exist; allowed: a study folder "
                                "written by `resstream compare`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"report: {str(path)!r} is not valid JSON: {error}") from None


# ---------------------------------------------------------------------------- markdown

def report_markdown(results: dict, figures: list[str]) -> str:
    study, variants = results["study"], results["variants"]
    baseline = results["baseline"]
    n_seeds = len(results["seeds"])
    lines = [f"# Study `{study['name']}`", ""]
    if results.get("smoke"):
        lines += ["> **Smoke run** (RESSTREAM_SMOKE): budgets were capped to a few steps; "
                  "nothing here is a measurement.", ""]
    if results.get("time_budget"):
        lines += [f"> **Budget lowered by --time-budget:** {results['time_budget']}", ""]
    if study.get("description"):
        lines += [study["description"].strip(), ""]
    lines += _setup_lines(results), ""
    if n_seeds < 2:
        lines += ["**One seed: this study cannot rank its variants.** Differences below have no "
                  "variance estimate, so no interval and no test; run at least 3 seeds.", ""]
    lines += ["## Summary", "", *summary_table(results), ""]
    lines += _reading_lines(results), ""
    lines += ["## Systems costs", "", *systems_table(results), "", _systems_notes(results), ""]
    lines += ["## Validation curves", "",
              "![validation bpb curves](figures/bpb_curves.png)", "",
              "Mean over seeds; the band spans the lowest and highest seed; the y axis is "
              "zoomed on the later evaluations. The diamond is the final evaluation, on a "
              "larger validation sample than the periodic ones. Time is training time "
              "(evaluation excluded) on the machine that ran the study.", "",
              "![paired differences](figures/final_bpb.png)", ""]
    routing = [name for name in figures if name.startswith("routing_")]
    if routing:
        lines += ["## Looking inside: routing weights", "",
                  "From each variant's trained model of the first seed, averaged over "
                  "validation tokens (`ResStreamLM.depth_routing`).", ""]
        lines += [f"![{name[:-4]}](figures/{name})" for name in routing] + [""]
    lines += ["## Per-seed results", "", *seed_table(results), ""]
    lines += ["## Reproduce", "", "```", study["file"].rstrip(), "```", "",
              *_environment_lines(results), ""]
    return "\n".join(lines)


def _setup_lines(results: dict) -> str:
    study, data = results["study"], results["data"]
    budget_kind, budget_value = next(iter(study["budget"].items()))
    budget = {"tokens": f"{budget_value:,.0f} training tokens per run",
              "steps": f"{budget_value:,.0f} optimizer steps per run",
              "flops": f"{budget_value:.3g} training FLOPs per run (each variant's steps from "
                       "its own FLOPs per token)"}[budget_kind]
    return (f"Preset `{study['preset']}`, {len(results['variants'])} variants x "
            f"{len(results['seeds'])} seeds ({', '.join(map(str, results['seeds']))}), "
            f"budget {budget}. Data `{data['source']}` ({data['train_tokens']:,} training "
            f"tokens, {data['val_tokens']:,} validation tokens), sequences of "
            f"{data['seq_len']} x batch {data['batch_size']}. Every variant sees the same data "
            "order and starts from the same weights for the parameters it shares with the "
            f"baseline (`{results['baseline']}`), seed by seed. Final validation bits per byte "
            "are measured on fixed, evenly spread windows of the held-out text.")


def summary_table(results: dict) -> list[str]:
    contexts = " / ".join(str(row["context"]) for row in _first_decode(results))
    header = ("variant", "val bpb (mean, 95% CI)", "delta vs baseline (95% CI)", "p (Holm)",
              "verdict", "params", "MFLOPs/token", "tokens/s (x base)", "train act. MiB (x base)",
              f"decode ms/token (ctx {contexts})", f"cache KiB (ctx {contexts})",
              "stage state /token")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["variants"].items():
        systems = entry.get("systems") or {}
        delta = entry["delta_vs_baseline"]
        decode = systems.get("decode") or []
        cells = [
            f"`{name}`" + (" (baseline)" if name == results["baseline"] else ""),
            _mean_ci(entry["val_bpb_mean"], entry["val_bpb_ci95"]),
            "—" if delta is None else _mean_ci(delta["mean"], delta["ci95"], signed=True),
            "—" if delta is None or delta["p_holm"] is None else
            f"{delta['p_value']:.3g} ({delta['p_holm']:.3g})",
            "—" if delta is None else delta["verdict"],
            f"{systems['parameters'] / 1e6:.3f}M" if systems else "?",
            f"{systems['flops_per_token'] / 1e6:.2f}" if systems else "?",
            f"{systems['tokens_per_s']:,.0f} ({systems['tokens_per_s_ratio']:.2f}x)"
            if systems else "?",
            f"{systems['train_activation_bytes'] / 2**20:.1f} "
            f"({systems['train_activation_ratio']:.2f}x)" if systems else "?",
            " / ".join(f"{row['ms_per_token']:.2f}" for row in decode) or "?",
            " / ".join(f"{row['cache_bytes'] / 1024:.0f}" for row in decode) or "?",
            f"{systems['pipeline_state_vectors']} x d ({systems['pipeline_state_bytes_per_token']:,} B)"
            if systems else "?",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _first_decode(results: dict) -> list[dict]:
    first = next(iter(results["variants"].values()))
    return (first.get("systems") or {}).get("decode") or []


def _reading_lines(results: dict) -> str:
    baseline = results["baseline"]
    if len(results["seeds"]) < 2:
        return ("With one seed every verdict reads 'cannot tell'.")
    significant = [(name, e["delta_vs_baseline"]) for name, e in results["variants"].items()
                   if e["delta_vs_baseline"] and e["delta_vs_baseline"]["significant"]]
    text = (f"Deltas are paired over seeds (variant minus `{baseline}` with the same seed and "
            "data order; negative is better), with a two-sided paired t-test and Holm's "
            f"correction across the {len(results['variants']) - 1} comparisons "
            f"(family-wise alpha = {results['alpha']}). ")
    if not significant:
        return text + ("No variant differs significantly from the baseline at this budget and "
                       "number of seeds.")
    parts = [f"`{name}` ({d['mean']:+.4f} bpb, {d['verdict'].replace('significantly ', '')})"
             for name, d in significant]
    return text + "Significant after correction: " + ", ".join(parts) + "."


def systems_table(results: dict) -> list[str]:
    header = ("variant", "decode context", "ms/token", "x baseline", "cache bytes")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["variants"].items():
        for row in (entry.get("systems") or {}).get("decode", []):
            rows.append(f"| `{name}` | {row['context']} | {row['ms_per_token']:.3f} | "
                        f"{row.get('latency_ratio', float('nan')):.2f} | {row['cache_bytes']:,} |")
    return rows


def _systems_notes(results: dict) -> str:
    first = next(iter(results["variants"].values())).get("systems") or {}
    layer = first.get("pipeline_boundary_layer", "?")
    return ("Training FLOPs per token: 6 per multiply-add of every sublayer, the attention "
            "scores over the actual window and the depth operator's own reads and writes "
            "(`resstream.flops`). Tokens/s: mean over seeds of each run's training throughput "
            "(measured in the study runs, so on a shared machine it carries that noise). "
            "Training activations: bytes autograd saves for backward in one forward + loss at "
            "the study's batch. Decode: cached decode of one token, batch 1, median of 5 "
            "repeats, at the contexts listed; cache bytes are measured on a cache of that "
            "many tokens. Stage state: d-vectors per token that cross a pipeline-stage "
            f"boundary after block {layer} (fp32 bytes), as each operator declares it.")


def seed_table(results: dict) -> list[str]:
    seeds = results["seeds"]
    rows = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | steps | tokens |",
            "|" + "---|" * (len(seeds) + 3)]
    for name, entry in results["variants"].items():
        values = " | ".join(f"{v:.4f}" for v in entry["val_bpb"])
        rows.append(f"| `{name}` | {values} | {entry['steps']:,} | {entry['tokens']:,} |")
    matched = [(n, e["match"]) for n, e in results["variants"].items() if e.get("match")]
    if matched:
        rows += [""] + [f"Parameter matching of `{name}`: {text}." for name, text in matched]
    return rows


def _environment_lines(results: dict) -> list[str]:
    env = results["environment"]
    git = env.get("git") or {}
    commit = git.get("commit", "unknown") + (" (with uncommitted changes)" if git.get("dirty")
                                             else "")
    return [f"Run with `resstream compare` on {env.get('time_utc', '?')}: resstream "
            f"{env.get('resstream_version')} at commit {commit}, source sha256 "
            f"`{env.get('source_sha256', '?')[:16]}`; Python {env.get('python')}, torch "
            f"{env.get('torch')}, {env.get('platform')}, {env.get('cpu_count')} CPUs, "
            f"{env.get('torch_threads')} torch threads"
            + (f", GPU {env['cuda_device']}" if env.get("cuda_device") else "") + ".",
            "", "Every run's resolved config is in `results.json` (`variants.*.config`) and "
            "in its run folder (`runs/<variant>/seed-<s>/config.json`)."]


def _mean_ci(mean: float, ci, signed: bool = False) -> str:
    value = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if ci is None:
        return value
    return f"{value} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if signed else \
        f"{value} [{ci[0]:.4f}, {ci[1]:.4f}]"


# ---------------------------------------------------------------------------- figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path) -> Path:
    """Validation bpb vs training tokens (left) and vs training time (right): the periodic
    evaluations as lines, the final evaluation (a larger validation sample, so a slightly
    different estimate) as a diamond at the end."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    colors = plt.get_cmap("tab20" if len(results["variants"]) > 10 else "tab10")
    later = []
    for index, (name, entry) in enumerate(results["variants"].items()):
        curves = [run["curve"] for run in entry["runs"]]
        length = min(len(c) for c in curves)
        color = colors(index % colors.N)
        for axis, column in zip(axes, (1, 2)):
            xs = [_mean([c[i][column] or 0.0 for c in curves]) for i in range(length)]
            ys = [[c[i][3] for c in curves] for i in range(length)]
            periodic = length - 1  # the last point is the final evaluation
            axis.plot(xs[:periodic], [_mean(v) for v in ys[:periodic]], marker="o",
                      markersize=2.5, linewidth=1.4, color=color, label=name)
            axis.plot(xs[-1:], [_mean(ys[-1])], marker="D", markersize=5, color=color,
                      linestyle="none")
            if len(curves) > 1:
                axis.fill_between(xs[:periodic], [min(v) for v in ys[:periodic]],
                                  [max(v) for v in ys[:periodic]], color=color, alpha=0.15,
                                  linewidth=0)
        later += [c[i][3] for c in curves for i in range(1, len(c))]
    if later:  # the untrained point (~8 bpb) would flatten everything else
        low = min(later)
        high = sorted(later)[int(0.9 * (len(later) - 1))]  # 90th percentile of later points
        margin = 0.06 * (high - low + 1e-3)
        for axis in axes:
            axis.set_ylim(low - margin, high + margin)
    from matplotlib.ticker import EngFormatter

    axes[0].xaxis.set_major_formatter(EngFormatter())  # 200k, 1M: no colliding long labels
    axes[0].set_xlabel("training tokens")
    axes[1].set_xlabel("training time (s, evaluation excluded)")
    for axis in axes:
        axis.set_ylabel("validation bits per byte")
        axis.grid(True, alpha=0.3)
    axes[0].set_title("Validation bpb vs tokens (band: min-max over seeds)")
    axes[1].set_title("Validation bpb vs training time (diamond: final evaluation)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.87, 0.5), fontsize=8,
                  frameon=False)
    figure.tight_layout(rect=(0, 0, 0.87, 1))
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_differences(results: dict, path: Path) -> Path | None:
    """Paired difference to the baseline with its 95% CI, one row per variant (a forest plot)."""
    rows = [(name, e["delta_vs_baseline"]) for name, e in results["variants"].items()
            if e["delta_vs_baseline"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6), dpi=110)
    for y, (name, delta) in enumerate(reversed(rows)):
        color = ("tab:green" if delta["verdict"] == "significantly better" else
                 "tab:red" if delta["verdict"] == "significantly worse" else "tab:gray")
        if delta["ci95"]:
            axis.plot(delta["ci95"], [y, y], color=color, linewidth=2)
        axis.plot([delta["mean"]], [y], "o", color=color)
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([name for name, _ in reversed(rows)])
    axis.set_xlabel(f"final val bpb minus {results['baseline']} (paired over seeds, 95% CI; "
                    "negative is better)")
    axis.set_title("Paired difference to the baseline (green/red: significant after Holm)")
    axis.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_routing(results: dict, figures: Path) -> list[Path]:
    """The routing figures of every variant that has routing weights."""
    from resstream import report_figures
    from resstream.routing import routing_from_json

    routing = {name: routing_from_json(entry["routing"])
               for name, entry in results["variants"].items()
               if entry.get("routing") and entry["routing"].get("kind") not in (None, "none")}
    by_kind: dict[str, dict] = {}
    for name, result in routing.items():
        by_kind.setdefault(result["kind"], {})[name] = result
    written = []
    attention = {**by_kind.get("depth_attention", {}), **by_kind.get("depth_weights", {})}
    if attention:
        written.append(report_figures.plot_depth_attention(attention,
                                                           figures / "routing_depth_weights.png"))
        if by_kind.get("depth_attention"):
            written.append(report_figures.plot_mean_max_weight(
                by_kind["depth_attention"], figures / "routing_mean_max_weight.png"))
    for name, result in by_kind.get("ddl_beta", {}).items():
        written.append(report_figures.plot_ddl_beta(result, figures / f"routing_ddl_beta_{name}.png"))
    if by_kind.get("stream_mixing"):
        written.append(report_figures.plot_stream_mixing(by_kind["stream_mixing"],
                                                         figures / "routing_stream_mixing.png"))
    return [Path(p) for p in written if p is not None]


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)
