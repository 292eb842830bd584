"""The learning rate of each update (paper section 5.3, and two schedules from elsewhere)."""

from __future__ import annotations

import math

from qkv.errors import QkvError


def learning_rate(
    step: int, schedule: str, lr: float, d_model: int, warmup: int, max_steps: int = 0
) -> float:
    """The learning rate of update number `step` (counted from 1).

    'noam' (section 5.3): lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).
    'inverse_sqrt' (fairseq): linear warm-up to lr, then lr * sqrt(warmup / step).
    'cosine' (Loshchilov & Hutter, 2017, without restarts): linear warm-up to lr, then half a cosine
    down to 0 at `max_steps`. Both schedules above never anneal; in a short run of known length
    (the demo) the last, small steps are what make every character of the output right.
    """
    step = max(step, 1)
    if schedule == "noam":
        return lr * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
    if schedule == "inverse_sqrt":
        return lr * min(step / warmup, math.sqrt(warmup / step))
    if schedule == "cosine":
        if max_steps <= 0:
            raise QkvError("train.lr_schedule = 'cosine' needs train.max_steps > 0")
        if step <= warmup:
            return lr * step / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise QkvError(
        f"train.lr_schedule must be 'noam', 'inverse_sqrt' or 'cosine', not {schedule!r}"
    )


# ---------------------------------------------------------------------------------------------------
# Devices
