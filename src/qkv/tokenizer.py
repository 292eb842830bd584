"""The subword model: SentencePiece, trained jointly on both languages, with fixed special ids.

Every qkv tokenizer reserves the same four ids (pad=0, unk=1, bos=2, eos=3) so that the model, the
batcher and the search can take them from here instead of from literals scattered around.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from qkv.errors import QkvError
from qkv.text import read_lines


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    bos: int
    eos: int

    def as_dict(self) -> dict[str, int]:
        return {"pad": self.pad, "unk": self.unk, "bos": self.bos, "eos": self.eos}


SPECIALS = SpecialIds(pad=0, unk=1, bos=2, eos=3)
MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB_SIZE = 8  # the 4 special tokens and a few pieces: SentencePiece refuses fewer
# A source is a text file (str or Path, plain or .gz) or an iterable of sentences.
TextSource = str | os.PathLike | Iterable[str]


class Tokenizer:
    """A trained SentencePiece model. `encode` adds no special ids; `decode` drops them."""

    # The same for every qkv tokenizer (checked on load), so readable from the class itself.
    specials = SPECIALS
    pad_id, unk_id, bos_id, eos_id = SPECIALS.pad, SPECIALS.unk, SPECIALS.bos, SPECIALS.eos

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self._sp = processor
        self.path = path
        found = SpecialIds(
            pad=processor.pad_id(),
            unk=processor.unk_id(),
            bos=processor.bos_id(),
            eos=processor.eos_id(),
        )
        if found != SPECIALS:
            where = path or "the tokenizer"
            raise QkvError(
                f"{where}: special ids {found.as_dict()}, qkv needs {SPECIALS.as_dict()}"
            )

    @classmethod
    def train(
        cls,
        sources: TextSource | Iterable[TextSource],
        out: str | os.PathLike,
        vocab_size: int = 8000,
        model_type: str = "bpe",
        *,
        split_digits: bool = False,
        max_sentences: int = 2_000_000,
    ) -> Tokenizer:
        """Train one model on all `sources` together and save it as `out` (`.model` + `.vocab`).

        `sources` is a file, an iterable of sentences, or a list of those (one per language: the
        model is joint, so source and target share one vocabulary). `out` is the model path
        (`dir/tokenizer.model`) or its prefix (`dir/tokenizer`).
        """
        if model_type not in MODEL_TYPES:
            raise QkvError(f"unknown tokenizer type {model_type!r}; choose one of {MODEL_TYPES}")
        prefix = _model_prefix(Path(out))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        # Train under a temporary name, then rename: a crash never leaves half a model behind.
        partial = prefix.with_name(f".{prefix.name}.{os.getpid()}.partial")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_sentences(sources),
                model_prefix=str(partial),
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=SPECIALS.pad,
                unk_id=SPECIALS.unk,
                bos_id=SPECIALS.bos,
                eos_id=SPECIALS.eos,
                # Multi30k's languages are all Latin script: keep every character (no unk for é, ů).
                character_coverage=1.0,
                split_digits=split_digits,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                num_threads=min(4, os.cpu_count() or 1),
                minloglevel=2,
            )
        except RuntimeError as error:
            raise QkvError(f"training the tokenizer failed: {_in_qkvs_terms(error)}") from None
        for suffix in (".vocab", ".model"):
            os.replace(f"{partial}{suffix}", f"{prefix}{suffix}")
        return cls.load(f"{prefix}.model")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.model` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise QkvError(f"{path}: no such tokenizer model")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as error:
            raise QkvError(f"{path}: not a SentencePiece model ({error})") from None
        return cls(processor, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(utf8_text(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many sentences at once (SentencePiece runs them in parallel)."""
        return self._sp.encode([utf8_text(text) for text in texts])

    def sample_batch(self, texts: list[str], dropout: float, seed: int) -> list[list[int]]:
        """`encode_batch` with BPE-dropout: each merge skipped with probability `dropout`.

        The same seed gives the same segmentation: one thread, SentencePiece's generator seeded first.
        """
        spm.set_random_generator_seed(seed)
        return self._sp.encode(
            texts, enable_sampling=True, alpha=dropout, nbest_size=-1, num_threads=1
        )

    def encode_as_pieces(self, text: str) -> list[str]:
        return self._sp.encode(utf8_text(text), out_type=str)

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece's decode skips bos/eos but renders pad as a piece: drop the specials here.
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in specials])

    def id_to_piece(self, id: int) -> str:
        return self._sp.id_to_piece(int(id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, vocab_size={self.vocab_size})"


def _model_prefix(out: Path) -> Path:
    return out.parent / out.stem if out.suffix == ".model" else out


def _sentences(sources: TextSource | Iterable[TextSource]) -> Iterator[str]:
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    for source in sources:
        if isinstance(source, str | os.PathLike):
            yield from read_lines(source)
        else:
            yield from source


def utf8_text(text: str) -> str:
    """`text`, if it can be written as UTF-8; else a clear error. A command-line argument with bytes
    that are not UTF-8 arrives holding lone surrogates, which SentencePiece fails on with a traceback."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        # Bytes that were not UTF-8 arrive as U+DC80..U+DCFF (Python's surrogateescape).
        what = f"byte {code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise QkvError(
            f"not valid UTF-8 text ({what} at character {error.start + 1}): {text[:40]!a}"
        ) from None
    return text


def _in_qkvs_terms(error: RuntimeError) -> str:
    """SentencePiece's message, said with qkv's option where it names its own: it spoke of
    `--character_coverage` and `vocab_size`, which qkv prepare does not have or calls otherwise."""
    text = str(error)
    if match := re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text
    ):
        return f"--vocab-size {match[1]} is more than this text gives: at most {match[2]}"
    if match := re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text):
        return (
            f"--vocab-size {match[1]} is below the {match[2]} subwords this text needs (one for "
            f"each character it holds): give at least {match[2]}"
        )
    return text
