"""Translating with a model that `qkv export --format ctranslate2` wrote: the `Translator` interface
(`hypotheses`, `translate`, `tokenizer`, `meta`, `precision`) over `ctranslate2.Translator`, so that
`qkv translate DIR` and `qkv evaluate DIR` take the same options and print the same things.

One difference, said once on use: CTranslate2 ranks beams by score / len^alpha, qkv's
`length_penalty_style="fairseq"`; qkv's default "gnmt" penalty ((5 + len) / 6)^alpha is not in it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from qkv.checkpoint import TOKENIZER
from qkv.errors import QkvError
from qkv.length_penalty import alpha_problem
from qkv.tokenizer import Tokenizer
from qkv.translate import Hypothesis, _progress_bar, token_batches

MODEL_FILES = ("model.bin", "config.json")
COMPUTE_TYPES = {"auto": "default", "fp32": "float32", "bf16": "bfloat16", "int8": "int8"}
EXTRA_POSITIONS = 50  # generated tokens beyond the source's length, as qkv's default max_len


def is_ctranslate2_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in MODEL_FILES)


class CTranslate2Translator:
    """A CTranslate2 model directory with its tokenizer.model, translating as `qkv.translate`'s."""

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu",
                 precision: str = "auto", warn: Callable[[str], None] | None = None):  # fmt: skip
        try:
            import ctranslate2
        except ImportError:
            raise QkvError(
                f'{path} is a CTranslate2 model: pip install "qkv[export]" to translate with it'
            ) from None
        path = Path(path)
        if precision not in COMPUTE_TYPES:
            raise QkvError(
                f"precision must be one of {', '.join(COMPUTE_TYPES)}, not {precision!r}"
            )
        tokenizer_path = Path(tokenizer) if tokenizer else path / TOKENIZER
        if not tokenizer_path.exists():
            raise QkvError(f"{path}: no {TOKENIZER} in it; pass the tokenizer's path (--tokenizer)")
        self.tokenizer = Tokenizer.load(tokenizer_path)
        info_path = path / "qkv_export.json"
        self.meta = json.loads(info_path.read_text()) if info_path.exists() else {}
        self.max_len = self.meta.get("max_len", 256)
        kind, _, index = device.partition(":")  # "cuda:1" ran on the first GPU
        try:
            self.translator = ctranslate2.Translator(
                str(path), device=kind, device_index=int(index or 0),
                compute_type=COMPUTE_TYPES[precision],
            )  # fmt: skip
        except (ValueError, RuntimeError) as error:  # bf16 on a CPU it refuses, no such GPU, ...
            raise QkvError(
                f"{path}: CTranslate2 cannot run it with --precision {precision} on {device}: "
                f"{str(error).splitlines()[0]}"
            ) from None
        self.precision = f"ctranslate2 {self.translator.compute_type}"
        # qkv's search never generates padding or BOS (`qkv.search.banned_ids`): nor does this
        piece = self.tokenizer.id_to_piece
        self._never = [[piece(self.tokenizer.pad_id)], [piece(self.tokenizer.bos_id)]]
        self._warn = warn or _warn
        self._told_penalty = False
        self._told_early_exit = False

    def translate(self, sentences: Sequence[str], beam: int = 5, **options) -> list[str]:
        options.setdefault("scores", False)
        return [best[0].text for best in self.hypotheses(sentences, beam=beam, **options)]

    def hypotheses(
        self,
        sentences: Sequence[str],
        beam: int = 5,
        n_best: int = 1,
        max_tokens: int = 4096,
        length_penalty: float = 0.6,
        length_penalty_style: str = "gnmt",
        max_len: int | None = None,
        min_len: int = 0,
        early_exit: bool = False,
        progress=False,
        warn: Callable[[str], None] | None = None,
        first_line: int = 1,
        scores: bool = True,
    ) -> list[list[Hypothesis]]:
        """As `qkv.translate.Translator.hypotheses`, decoded by CTranslate2 (scores=False: its
        `return_scores=False`, the scores NaN)."""
        if not 1 <= n_best <= beam:
            raise QkvError(f"--n-best must be between 1 and the beam size {beam}, got {n_best}")
        if problem := alpha_problem(length_penalty):  # as qkv's own search
            raise QkvError(f"--length-penalty {problem}")
        if (
            beam > 1
            and length_penalty
            and length_penalty_style == "gnmt"
            and not self._told_penalty
        ):
            self._told_penalty = True
            self._warn(
                "CTranslate2 ranks beams by score / len^alpha (--length-penalty-style fairseq); "
                "qkv's gnmt penalty ((5 + len) / 6)^alpha is not in it"
            )
        if beam > 1 and early_exit and not self._told_early_exit:
            self._told_early_exit = True
            self._warn(
                "CTranslate2 ends a sentence's beam search when beam x patience hypotheses have "
                "ended; --early-exit is for qkv's own engine"
            )
        warn = warn or self._warn
        pieces = []
        limit = self.max_len - 1  # room for EOS, as qkv's model
        for number, sentence in enumerate(sentences, start=first_line):
            tokens = self.tokenizer.encode_as_pieces(sentence) if sentence.strip() else []
            if len(tokens) > limit:
                warn(f"line {number}: {len(tokens)} subword tokens, more than the model's {limit}: "
                     f"translating the first {limit}")  # fmt: skip
                tokens = tokens[:limit]
            pieces.append(tokens)
        results = [[Hypothesis("", 0.0, [])] for _ in sentences]
        own_bar = isinstance(progress, bool)
        bar = _progress_bar(len(sentences), progress) if own_bar else progress
        bar.update(sum(1 for tokens in pieces if not tokens))  # empty lines are done already
        to_id = self.tokenizer.piece_to_id
        # Batches of similar lengths, as qkv's: each bounds its hypotheses by its longest source + 50.
        sources = [
            [*tokens, "</s>"] if tokens else [] for tokens in pieces
        ]  # EOS counted, as qkv's
        for batch in token_batches(sources, max_tokens):
            longest = max(len(sources[i]) for i in batch)
            outputs = self.translator.translate_batch(
                [pieces[i] for i in batch],
                beam_size=beam,
                num_hypotheses=n_best,
                length_penalty=length_penalty,
                max_decoding_length=max_len or min(longest + EXTRA_POSITIONS, self.max_len),
                min_decoding_length=min_len,
                return_scores=scores,
                suppress_sequences=self._never,
            )
            for index, output in zip(batch, outputs, strict=True):
                output_scores = output.scores if scores else [math.nan] * len(output.hypotheses)
                results[index] = [
                    Hypothesis(self.tokenizer.decode(ids), float(score), ids)
                    for ids, score in (
                        ([to_id(piece) for piece in tokens], score)
                        for tokens, score in zip(output.hypotheses, output_scores, strict=True)
                    )
                ]
            bar.update(len(batch))
        if own_bar:
            bar.close()
        return results


def _warn(message: str) -> None:
    from qkv.errors import warn

    warn(message, stacklevel=4)
