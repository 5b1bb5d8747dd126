# examples/pipeline_step.py: one training step of a 2-stage pipeline, on CPU (gloo) or GPUs (NCCL).
# Run: torchrun --standalone --nproc-per-node 2 examples/pipeline_step.py
import os

import torch
import torch.distributed as dist

from resstream.model import ResStreamLM
from resstream.parallel.pipeline import build_pipeline
from resstream.presets import get_preset

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu")

torch.manual_seed(0)  # every rank builds the same model and the same batch
config = get_preset("tiny").config(depth="block_attnres")
model = ResStreamLM(config).to(device)
input_ids = torch.randint(0, config.vocab_size, (8, 32), device=device)
targets = input_ids.roll(-1, dims=1)

pipe = build_pipeline(model, stage_rank=rank, n_stages=world_size, schedule="1f1b",
                      n_microbatches=4)            # loss_fn defaults to mean cross-entropy
optimizer = torch.optim.AdamW(pipe.parameters(), lr=3e-4)
optimizer.zero_grad()
loss = pipe.step(input_ids, targets)              # the mean loss on the last stage, else None
optimizer.step()
if loss is not None:
    print(f"stage {rank}: loss {loss.item():.4f}")
dist.destroy_process_group()
