"""Scale-out on PyTorch's own distributed engine, applied to a model from outside (as
torchtitan's `parallelize` does): `data_parallel` (DDP, FSDP2 under torchrun) and `pipeline`
(torch.distributed.pipelining, with the depth operator's state relayed between stages).
See docs/distributed.md."""
