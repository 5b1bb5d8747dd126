"""`resstream compare` end to end on a tiny study: two variants, two seeds, a few steps, a local
text file. The report's numbers are checked against the run logs, `resstream report`
reproduces report.md byte for byte, and an interrupted study resumes to the same results."""
from __future__ import annotations

import json

import pytest
import torch

from resstream.cli import main
from resstream.compare import runner
from resstream.model import ResStreamLM
from resstream.presets import get_preset
from resstream.train.trainer import copy_shared_init

pytestmark = pytest.mark.usefixtures("private_data_cache")

STUDY = """
name: tiny-study
preset: tiny
seeds: [0, 1]
budget: {{steps: 4}}
config:
  data: {{source: {corpus}, seq_len: 32, batch_size: 4}}
  optim: {{lr: 3.0e-3, warmup_steps: 1}}
  train: {{eval_every: 1, eval_tokens: 128, final_eval_tokens: 256, eval_batch_size: 4,
          checkpoint_every: 1}}
variants:
  baseline: {{}}
  ddl: {{model: {{depth: ddl}}}}
systems: {{decode_contexts: [8, 32], decode_steps: 2}}
"""


@pytest.fixture
def study_file(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n\n" * 120,
                      encoding="utf-8")
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(corpus=corpus), encoding="utf-8")
    return path


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_study_end_to_end(study_file, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["compare", str(study_file), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "ddl" in printed
    for name in ("report.md", "results.json", "study.yaml", "plan.json",
                 "figures/bpb_curves.png", "figures/final_bpb.png"):
        assert (out / name).is_file(), name
    assert (out / "figures/bpb_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "baseline" and results["seeds"] == [0, 1]
    assert results["study"]["name"] == "tiny-study"
    for name, entry in results["variants"].items():
        finals = []
        for seed in (0, 1):
            records = _metrics(out / "runs" / name / f"seed-{seed}")
            final = next(r for r in records if r["kind"] == "final")
            finals.append(final["val_bpb"])
            run = next(r for r in entry["runs"] if r["seed"] == seed)
            evals = [r for r in records if r["kind"] == "eval"]
            assert [c[3] for c in run["curve"]] == [r["val_bpb"] for r in evals]
            assert len(evals) == 5  # step 0 and each of the 4 steps
        assert entry["val_bpb"] == finals
        assert entry["val_bpb_mean"] == pytest.approx(sum(finals) / 2)
        low, high = entry["val_bpb_ci95"]
        assert low < entry["val_bpb_mean"] < high
        systems = entry["systems"]
        assert systems["parameters"] == entry["runs"][0]["num_parameters"]
        assert systems["flops_per_token"] > 0 and systems["train_activation_bytes"] > 0
        assert [row["context"] for row in systems["decode"]] == [8, 32]
        assert entry["steps"] == 4
    delta = results["variants"]["ddl"]["delta_vs_baseline"]
    assert delta["mean"] == pytest.approx(results["variants"]["ddl"]["val_bpb_mean"]
                                          - results["variants"]["baseline"]["val_bpb_mean"])
    assert set(delta) >= {"mean", "ci95", "p_value", "significant"}
    assert results["variants"]["baseline"]["delta_vs_baseline"] is None
    report = (out / "report.md").read_text()
    assert f"{results['variants']['ddl']['val_bpb_mean']:.4f}" in report
    assert "Holm" in report and "tiny-study" in report
    # the same data order: every variant trained on identical token counts
    assert len({e["tokens"] for e in results["variants"].values()}) == 1

    before = (out / "report.md").read_bytes()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_bytes() == before

    # a non-empty folder without --resume is refused and left as it was
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["compare", str(study_file), "--out", str(out)]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing


class _Killed(Exception):
    pass


def test_interrupted_study_resumes_to_the_same_results(study_file, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert main(["compare", str(study_file), "--out", str(reference), "--no-progress"]) == 0
    expected = json.loads((reference / "results.json").read_text())

    from resstream.train import trainer as trainer_module

    original_save, saves = trainer_module.Trainer._save, []

    def save_then_die(self, *args, **kwargs):
        path = original_save(self, *args, **kwargs)
        saves.append(path)
        if len(saves) == 6:  # the second run, half way (steps 1-4 each save)
            raise _Killed
        return path

    monkeypatch.setattr(trainer_module.Trainer, "_save", save_then_die)
    out = tmp_path / "interrupted"
    with pytest.raises(_Killed):
        main(["compare", str(study_file), "--out", str(out), "--no-progress"])
    monkeypatch.setattr(trainer_module.Trainer, "_save", original_save)
    assert not (out / "results.json").exists()
    assert main(["compare", str(study_file), "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = json.loads((out / "results.json").read_text())
    for name, entry in expected["variants"].items():
        assert resumed["variants"][name]["val_bpb"] == entry["val_bpb"]
        for ours, theirs in zip(resumed["variants"][name]["runs"], entry["runs"]):
            assert [c[3] for c in ours["curve"]] == [c[3] for c in theirs["curve"]]


def test_resume_refuses_a_different_study(study_file, tmp_path, capsys):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.yaml").write_text("name: other\n", encoding="utf-8")
    assert main(["compare", str(study_file), "--out", str(out), "--resume"]) == 2
    assert "differs" in capsys.readouterr().err


def test_shared_parameters_start_equal_across_variants():
    """A variant whose modules draw random numbers in another order (a ShortSWA sub-block is
    built before each block's attention) still starts from the baseline's weights wherever
    the two share a parameter."""
    base_config = get_preset("tiny").config()
    variant_config = get_preset("tiny").config(local_mixer="shortswa", local_window=8)
    torch.manual_seed(5)
    baseline = dict(ResStreamLM(base_config).named_parameters())
    torch.manual_seed(5)
    variant = ResStreamLM(variant_config)
    name = "blocks.1.attn.q_proj.weight"
    assert not torch.equal(dict(variant.named_parameters())[name], baseline[name])
    copy_shared_init(variant, base_config, 5)
    shared = [n for n, p in variant.named_parameters() if n in baseline]
    assert name in shared and len(shared) == len(baseline)
    for n, p in variant.named_parameters():
        if n in baseline:
            assert torch.equal(p, baseline[n]), n
    assert any(n.startswith("blocks.0.mix") for n, _ in variant.named_parameters())


def test_budget_by_flops_gives_costlier_variants_fewer_steps(tmp_path):
    from resstream.compare.study import parse_study
    from resstream.flops import training_flops_per_token

    study = parse_study(STUDY.format(corpus="shakespeare").replace("{steps: 4}",
                                                                   "{flops: 5.0e+10}"))
    plan = runner.plan_study(study, tmp_path)
    steps = {name: config.train.steps for name, config in plan.configs.items()}
    for name, config in plan.configs.items():
        per_step = training_flops_per_token(config.model_config(), 32) * 4 * 32
        assert steps[name] == int(5.0e10 // per_step)
    assert steps["ddl"] <= steps["baseline"]


def test_param_matching_widens_the_baseline(tmp_path):
    from resstream.compare.study import parse_study

    text = STUDY.format(corpus="shakespeare").replace(
        "ddl: {model: {depth: ddl}}", "wide: {model: {local_mixer: shortswa, local_window: 8}}")
    study = parse_study(text + "match: {params: wide}\n")
    plan = runner.plan_study(study, tmp_path)
    from resstream.param_match import count_parameters

    base = count_parameters(plan.configs["baseline"].model_config())
    wide = count_parameters(plan.configs["wide"].model_config())
    assert abs(base - wide) / wide <= 0.02
    assert "mlp_hidden" in plan.matches["baseline"]
    assert plan.configs["baseline"].model["mlp_hidden"] > get_preset("tiny").config().ffn_hidden


def test_time_budget_lowers_steps_says_so_and_resumes(study_file, tmp_path, capsys):
    out = tmp_path / "lowered"
    assert main(["compare", str(study_file), "--out", str(out), "--no-progress",
                 "--time-budget", "0.0001"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "--time-budget" in results["time_budget"]
    assert all(e["steps"] < 4 for e in results["variants"].values())
    report = (out / "report.md").read_text()
    assert "Budget lowered by --time-budget" in report.split("## Summary")[0]
    # resuming keeps the lowered plan (the finished runs are not redone)
    assert main(["compare", str(study_file), "--out", str(out), "--resume", "--no-progress"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["time_budget"] == results["time_budget"]
    assert {n: e["val_bpb"] for n, e in again["variants"].items()} == \
        {n: e["val_bpb"] for n, e in results["variants"].items()}


def test_a_full_budget_study_never_lowers_its_steps(study_file, tmp_path):
    out = tmp_path / "full"
    assert main(["compare", str(study_file), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["time_budget"] is None
    assert {e["steps"] for e in results["variants"].values()} == {4}
