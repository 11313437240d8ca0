"""Data parallelism over several processes with PyTorch's own engine: ``torchrun`` starts the
processes, ``torch.distributed`` connects them (gloo on CPU, nccl on CUDA), DDP or FSDP2
(``fully_shard``) keeps their models in step. ``group.py`` is the process group and the few
collectives the trainer needs; ``parallel.py`` wraps a model and measures its communication."""
