"""The length penalty by which a beam search ranks finished hypotheses (`qkv.search`), and by which
`qkv translate --scores` normalises greedy scores too."""

from __future__ import annotations

import math

from torch import Tensor

LENGTH_PENALTY_STYLES = ("gnmt", "fairseq")
# The largest alpha either way: 0.6-1.0 are usual; beyond 10, ((5 + len) / 6)^alpha of a long
# hypothesis outgrows a float (alpha 1000 raised OverflowError) and ranks nothing better.
MAX_ALPHA = 10.0


def alpha_problem(alpha: float) -> str | None:
    """Why `alpha` cannot be a length penalty's exponent, or None if it can."""
    if not (math.isfinite(alpha) and abs(alpha) <= MAX_ALPHA):
        return f"must be a number between {-MAX_ALPHA:g} and {MAX_ALPHA:g}, not {alpha!r}"
    return None


def length_penalty_factor(
    length: Tensor | int, alpha: float, style: str = "gnmt"
) -> Tensor | float:
    """The divisor of a hypothesis' log-probability: 'gnmt' ((5 + len) / 6)^alpha, the paper's (from Wu et
    al. 2016, as in tensor2tensor), or 'fairseq' len^alpha (fairseq, CTranslate2, Hugging Face).
    ``length`` counts generated tokens, EOS included."""
    if style == "gnmt":
        return ((5 + length) / 6) ** alpha
    if style == "fairseq":
        return length**alpha
    raise ValueError(
        f"length_penalty_style must be one of {', '.join(LENGTH_PENALTY_STYLES)}, not {style!r}"
    )
