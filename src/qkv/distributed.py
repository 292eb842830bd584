"""Where a training process runs: its device, its place among the processes torchrun started, and
the random number generators' states that an exact resume restores."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from qkv.errors import QkvError


@dataclass
class Distributed:
    """Where this process sits among the processes torchrun started (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def training_device(device_name: str, local_rank: int, cuda_available: bool) -> torch.device:
    """The device of this process: 'auto' is a GPU where torch sees one. A GPU always gets its index
    (the process's local rank under torchrun, else 0): torch.cuda.set_device refuses a bare 'cuda'."""
    if device_name == "auto":
        device_name = "cuda" if cuda_available else "cpu"
    if device_name == "cuda":
        device_name = f"cuda:{local_rank}"
    return torch.device(device_name)


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = training_device(device_name, local_rank, torch.cuda.is_available())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise QkvError("train.device asks for CUDA, but torch sees no GPU")
        if device.index >= torch.cuda.device_count():
            raise QkvError(
                f"this process wants {device}, but torch sees {torch.cuda.device_count()} GPU(s): "
                "start at most that many processes per node (torchrun --nproc_per_node), "
                "or train on the CPU with --set train.device='cpu'"
            )
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """The states come back wherever the checkpoint was loaded to (the GPU, when training on one), but
    the generators take CPU byte tensors only."""
    torch.set_rng_state(states["torch"].cpu())
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([state.cpu() for state in cuda_states])
