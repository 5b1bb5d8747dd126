"""Short timings that predict a study's wall time before it runs. They build their own model
and restore the global RNG afterwards, so they never change the runs they predict."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _timing_model(config):
    from resstream.model import ResStreamLM

    rng_state = torch.get_rng_state()
    model = ResStreamLM(config.model_config())
    torch.set_rng_state(rng_state)
    return model


def time_training_step(config, data, warmup: int = 1, timed: int = 2) -> float:
    """Mean wall seconds of `timed` AdamW steps of `config` after `warmup` untimed ones."""
    from resstream.train.trainer import batch_for_step

    model = _timing_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, targets = batch_for_step(data.train, config.seq_len, config.data.batch_size,
                                     config.train.seed, 0, 0)
    started = time.perf_counter()
    for index in range(warmup + timed):
        if index == warmup:
            started = time.perf_counter()
        loss = F.cross_entropy(model(inputs).reshape(-1, model.config.vocab_size),
                               targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / timed


def time_eval_token(config, data) -> float:
    """Wall seconds per token of an evaluation forward pass (after one warm-up pass)."""
    from resstream.train.trainer import batch_for_step

    model = _timing_model(config).eval()
    inputs, _ = batch_for_step(data.train, config.seq_len, config.train.eval_batch_size,
                               config.train.seed, 0, 0)
    with torch.no_grad():
        model(inputs)
        started = time.perf_counter()
        model(inputs)
    return (time.perf_counter() - started) / inputs.numel()
