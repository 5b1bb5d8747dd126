"""Every shipped config in configs/ loads, resolves to a valid model and trains for a few steps
(at toy size: the preset and data are overridden, everything else is the file's)."""
from __future__ import annotations

from pathlib import Path

import pytest

from resstream.compare.study import load_study
from resstream.train.config import TrainConfig, load_config_file
from resstream.train.trainer import Trainer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))


# one torch thread per worker comes from conftest.py
pytestmark = pytest.mark.usefixtures("private_data_cache")


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_resolves_and_trains(path, tmp_path):
    config = TrainConfig.from_dict(load_config_file(path))
    model_config = config.model_config()  # the full-size model config is valid
    assert model_config.max_seq_len >= config.seq_len
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("KING:\nWhat says the herald? Speak, and briefly.\n\n" * 100)
    small = config.with_overrides({
        "preset": "tiny", "data.source": str(corpus), "data.seq_len": 32, "data.batch_size": 2,
        "train.steps": 2, "train.eval_tokens": 64, "train.final_eval_tokens": 64,
        "train.compile": False, "train.device": "cpu", "train.progress": False})
    result = Trainer(small, tmp_path / "run").run()
    assert result.step == 2 and result.final_eval.bpb > 0
    assert small.optim == config.optim and small.model == config.model


def test_demo_study_recipe_matches_its_config():
    """configs/shakespeare-small.yaml is the demo study's baseline as a `resstream train`
    config: same preset, data and optimizer settings."""
    config = TrainConfig.from_dict(load_config_file(CONFIG_DIR / "shakespeare-small.yaml"))
    study = load_study("demo")
    assert config.preset == study.preset
    for section in ("data", "optim"):
        for key, value in study.config[section].items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
