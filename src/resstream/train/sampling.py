"""Text from a checkpoint by plain full-forward sampling (no decode cache): every new token
re-runs the model on the last `max_seq_len` tokens. Slow but simple and exact; cached generation
lives in resstream.generation."""
from __future__ import annotations

from pathlib import Path

import torch

from resstream.data.tokenizer import get_tokenizer
from resstream.errors import UserError
from resstream.train import checkpoint as ckpt


def load_model_from_checkpoint(path: str | Path, device: str = "cpu"):
    """(model, checkpoint) from a run folder, checkpoint folder or file inside one."""
    from resstream.config import ModelConfig
    from resstream.model import ResStreamLM

    loaded = ckpt.read_checkpoint(path, verify=True)
    model = ResStreamLM(ModelConfig.from_dict(loaded.state["model_config"]))
    ckpt.load_model_weights(loaded, model)
    return model.to(device).eval(), loaded


@torch.no_grad()
def sample_tokens(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = 40,
                  generator: torch.Generator | None = None) -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` sampled tokens (greedy when temperature=0)."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} is invalid; allowed: an integer >= 0")
    if temperature < 0:
        raise UserError(f"temperature={temperature} is invalid; allowed: a number >= 0")
    if top_k is not None and top_k < 1:
        raise UserError(f"top_k={top_k} is invalid; allowed: an integer >= 1")
    device = next(model.parameters()).device
    context_len = model.config.max_seq_len
    ids = list(prompt_ids) or [ord("\n")]
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-context_len:]], dtype=torch.long, device=device)
        logits = model(window)[0, -1].float()
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.numel():
                threshold = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        ids.append(next_id)
    return ids


def sample_text(path: str | Path, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                top_k: int | None = 40, seed: int = 0, device: str = "cpu") -> str:
    """Prompt plus `max_new_tokens` sampled tokens, decoded, from the checkpoint at `path`."""
    model, loaded = load_model_from_checkpoint(path, device)
    tokenizer = get_tokenizer((loaded.state.get("tokenizer") or {}).get("name", "bytes"))
    generator = torch.Generator().manual_seed(seed)
    ids = sample_tokens(model, tokenizer.encode(prompt).tolist(), max_new_tokens, temperature,
                        top_k, generator)
    return tokenizer.decode(ids if prompt else ids[1:])
