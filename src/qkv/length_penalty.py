"""The length penalty by which a beam search ranks finished hypotheses (`qkv.search`), and by which
`qkv translate --scores` normalises greedy scores too."""

from __future__ import annotations

from torch import Tensor

LENGTH_PENALTY_STYLES = ("gnmt", "fairseq")


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
