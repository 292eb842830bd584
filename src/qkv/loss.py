"""The training loss: label-smoothed cross-entropy (paper section 5.4), with a gradient written out.

loss = sum over real (non-pad) target tokens of (1 - eps) * NLL + eps * CE(uniform), where
NLL = -log p(target) and CE(uniform) = -mean over the vocabulary of log p, the cross-entropy against the
uniform distribution: what ``F.cross_entropy(..., label_smoothing=eps)`` computes. Its gradient with
respect to the logits of a real token is

    softmax(logits) - (1 - eps) * onehot(target) - eps / vocab

Autograd through ``log_softmax`` would keep the (tokens, vocab) fp32 log-probabilities for the backward
pass and make several passes over them (4000 tokens x 8000 words: 128 MB each time). Here they are
computed a block of rows at a time, so they stay in the cache, and recomputed in the backward pass:
3-5x faster than autograd on a training batch of the small model (benchmarks/README.md, "CPU kernels").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# fp32 values per block of rows on the CPU: 1 MB, about one core's L2 cache
CPU_BLOCK_VALUES = 1 << 18


def label_smoothed_loss(
    logits: Tensor, target: Tensor, epsilon: float, pad_id: int
) -> tuple[Tensor, Tensor]:
    """Summed label-smoothed cross-entropy and summed NLL (no gradient) over non-pad target tokens.

    logits (batch, len, vocab), any float dtype (computed in fp32), and target (batch, len); or logits
    (tokens, vocab) and target (tokens,), as ``Transformer.forward(..., only_at=)`` gives them.
    """
    logits = logits.flatten(0, -2)
    target = target.flatten()
    return _LabelSmoothedCrossEntropy.apply(logits, target, epsilon, pad_id)


def _blocks(logits: Tensor):
    """Slices of rows to compute at once: cache-sized on the CPU (smaller blocks measured faster,
    benchmarks/README.md); all rows on a GPU, where each block costs kernel launches."""
    n_rows, vocab = logits.shape
    per_block = max(1, CPU_BLOCK_VALUES // vocab if logits.device.type == "cpu" else n_rows)
    for start in range(0, n_rows, per_block):
        yield slice(start, min(start + per_block, n_rows))


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, pad_id: int):
        real = target != pad_id  # (tokens,)
        target = target.masked_fill(~real, 0)  # any valid index: pad rows are zeroed below
        nll = logits.new_empty(target.shape, dtype=torch.float32)
        uniform = torch.empty_like(nll)
        for rows in _blocks(logits):
            log_probs = F.log_softmax(logits[rows].float(), dim=-1)  # (block, vocab)
            nll[rows] = -log_probs.gather(1, target[rows, None]).squeeze(1)
            uniform[rows] = -log_probs.mean(dim=-1)
        loss = torch.where(real, (1 - epsilon) * nll + epsilon * uniform, 0.0).sum()
        nll_sum = torch.where(real, nll, 0.0).sum()
        ctx.save_for_backward(logits, target, real)
        ctx.epsilon = epsilon
        ctx.mark_non_differentiable(nll_sum)
        return loss, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_nll: Tensor):
        logits, target, real = ctx.saved_tensors
        epsilon, vocab = ctx.epsilon, logits.size(-1)
        grad = torch.empty_like(logits)
        row_scale = real.float() * grad_loss  # (tokens,): pad rows get no gradient
        for rows in _blocks(logits):
            block = torch.softmax(logits[rows].float(), dim=-1)
            block.sub_(epsilon / vocab)
            block.scatter_add_(
                1, target[rows, None], block.new_full((block.size(0), 1), epsilon - 1)
            )
            grad[rows] = block.mul_(row_scale[rows, None])
        return grad, None, None, None
