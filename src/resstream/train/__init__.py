"""Training: configs (YAML/JSON + overrides), the trainer, checkpoints and the CLI commands."""
from resstream.train.config import TrainConfig, load_config_file

__all__ = ["TrainConfig", "load_config_file"]
