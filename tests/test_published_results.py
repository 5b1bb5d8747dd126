"""The published study reports (docs/results/) are what `resstream report` writes from their
results.json today: a change to the report code, or a hand edit, fails here until the reports
are regenerated."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from resstream.compare.report import write_report
from resstream.config import ModelConfig

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PUBLISHED = sorted(p.parent for p in RESULTS.glob("*/results.json"))


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_report_regenerates_byte_for_byte(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    (copy / "report.md").unlink()
    write_report(copy, json.loads((copy / "results.json").read_text(encoding="utf-8")))
    assert (copy / "report.md").read_bytes() == (folder / "report.md").read_bytes()
    for figure in (folder / "figures").glob("*.png"):
        assert (copy / "figures" / figure.name).is_file(), figure.name
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    assert not results["smoke"] and len(results["seeds"]) >= 3


def test_the_published_studies_are_there():
    names = {p.name for p in PUBLISHED}
    assert "paper" in names, "docs/results/paper is missing (run `resstream compare paper`)"


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_published_model_configs_still_load(folder):
    """Each recorded model config is still valid today; a default that changed since a study
    ran is pinned in its record (canon ran with init "small", its default at the time)."""
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    for name, variant in results["variants"].items():
        config = ModelConfig.from_dict(variant["model_config"])
        if config.local_mixer == "canon":
            assert config.mixer_opts.init == "small", name
