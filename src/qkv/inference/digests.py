"""Digests of a module's tensors, for the keys of compiled programs (`qkv.inference.aoti.program_key`):
the weights a program holds as constants are part of what it is."""

from __future__ import annotations

import concurrent.futures
import hashlib

import torch
from torch import Tensor, nn


def weights_digest(module: nn.Module, digests: TensorDigests) -> bytes:
    """A digest of a module's state: each tensor's name and bytes. A tensor held under several names
    (the tied embeddings and output projection) is hashed once."""
    state = module.state_dict(keep_vars=True)
    first_name: dict[int, str] = {}  # a tensor's id -> the first name it has
    for name, tensor in state.items():
        first_name.setdefault(id(tensor), name)
    of_tensor = dict(
        zip(first_name, digests.of([state[name] for name in first_name.values()]), strict=True)
    )
    whole = hashlib.blake2b(digest_size=16)
    for name, tensor in state.items():
        first = first_name[id(tensor)]
        # a later name of a tensor: the name it was hashed under
        whole.update(
            name.encode() + b"\0" + (of_tensor[id(tensor)] if first == name else first.encode())
        )
    return whole.digest()


class TensorDigests:
    """Tensors' digests, each worked out once: an engine's programs (its encoder's, its steps', its
    beam steps') hold the same model's weights, which do not change while the engine serves (its
    programs hold them as constants). Hashing the small model's ~50 MB for each of two programs was
    ~120 ms of a cold `qkv translate --compile` of ~1.2 s."""

    def __init__(self) -> None:
        # a tensor's id -> the tensor (held, so that no other takes its id) and its digest
        self._known: dict[int, tuple[Tensor, bytes]] = {}

    def of(self, tensors: list[Tensor]) -> list[bytes]:
        missing = [tensor for tensor in tensors if id(tensor) not in self._known]
        if missing:  # hashlib lets go of the GIL while it hashes a buffer: threads side by side
            with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
                for tensor, digest in zip(missing, pool.map(_digest_of, missing), strict=True):
                    self._known[id(tensor)] = (tensor, digest)
        return [self._known[id(tensor)][1] for tensor in tensors]


def _digest_of(tensor: Tensor) -> bytes:
    data = tensor.detach().contiguous().view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).digest()
