"""Scale-out on PyTorch's own distributed engine, applied to a model from outside (as
torchtitan's `parallelize` does): `data_parallel` (DDP, FSDP2 under torchrun), `pipeline`
(torch.distributed.pipelining, with the depth operator's state relayed between stages) and
`pipeline_training` (`resstream train --parallel.pp`: stages x data-parallel replicas on a 2-D
mesh). See docs/distributed.md."""
