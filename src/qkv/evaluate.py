"""Scoring translations: sacreBLEU's BLEU and chrF with their signatures, and lower-cased BLEU.

sacreBLEU scores detokenised, cased text with its own tokenizer (13a), so figures are comparable across
papers that report them with the signature. Most Multi30k papers instead quote lower-cased BLEU on
tokenised text (multi-bleu.perl); `bleu_lowercase` (sacreBLEU, 13a, lower-cased) is the closest
reproducible figure, labelled as such, never as "BLEU".
"""

from __future__ import annotations

from collections.abc import Sequence

from qkv.errors import QkvError

METRICS = ("bleu", "chrf", "bleu_lowercase")


def score(
    hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str] = METRICS
) -> dict:
    """Corpus scores of `hypotheses` against one reference each.

    Returns {"bleu", "bleu_signature", "chrf", "chrf_signature", "bleu_lowercase",
    "bleu_lowercase_signature", "sentences"} (those of `metrics`); scores are 0-100.
    """
    import sacrebleu

    if len(hypotheses) != len(references):
        raise QkvError(
            f"{len(hypotheses)} translations but {len(references)} references: "
            "they must be aligned line by line"
        )
    if not hypotheses:
        raise QkvError("no sentences to score: the test set is empty")
    hypotheses, references = list(hypotheses), [list(references)]
    result: dict = {}
    every_metric = {
        "bleu": sacrebleu.BLEU,
        "chrf": sacrebleu.CHRF,
        "bleu_lowercase": lambda: sacrebleu.BLEU(lowercase=True),
    }
    for name in metrics:
        metric = every_metric[name]()
        result[name] = metric.corpus_score(hypotheses, references).score
        result[f"{name}_signature"] = str(metric.get_signature())
    result["sentences"] = len(hypotheses)
    return result


def format_scores(scores: dict) -> str:
    """Human-readable lines: each score with its signature."""
    rows = [
        ("BLEU", scores["bleu"], scores["bleu_signature"]),
        ("chrF", scores["chrf"], scores["chrf_signature"]),
        ("BLEU, lower-cased", scores["bleu_lowercase"], scores["bleu_lowercase_signature"]),
    ]
    lines = [f"{name:<18} {value:6.2f}   {signature}" for name, value, signature in rows]
    count = scores["sentences"]
    lines.append(
        f"({count} sentence{'' if count == 1 else 's'}; the lower-cased BLEU is for comparison with papers "
        "that quote lower-cased BLEU)"
    )
    return "\n".join(lines)
