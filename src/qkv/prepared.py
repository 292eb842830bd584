"""A prepared folder, as `qkv prepare` writes it and training and translation read it.

prepare.json            what was prepared, how, and the format version
prepare.partial         only while prepare writes: the files it is writing (a folder that holds it
                        was left by a prepare that stopped, and is not read)
tokenizer.model         the joint SentencePiece model
{split}.pt              the split's subword ids: one flat int32 tensor and offsets per side
{split}.{lang}          the raw text of val and test, for BLEU against the references
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qkv.atomic import atomic_write
from qkv.data import EncodedSplit, read_parallel
from qkv.errors import QkvError
from qkv.tokenizer import Tokenizer

FORMAT_VERSION = 1
INFO = "prepare.json"
# Written before the first file and removed after prepare.json: `prepare --force` over a prepared
# folder that stopped half way (killed, a full disk) left new splits beside the old tokenizer and the
# old prepare.json, a folder that loaded as whole and trained on ids of another vocabulary.
PARTIAL = "prepare.partial"


@dataclass
class PreparedData:
    """A prepared folder loaded: the tokenizer, the encoded splits (raw text for val/test)."""

    path: Path
    tokenizer: Tokenizer
    info: dict
    splits: dict[str, EncodedSplit]

    @property
    def src_lang(self) -> str:
        return self.info["src_lang"]

    @property
    def tgt_lang(self) -> str:
        return self.info["tgt_lang"]

    @property
    def train(self) -> EncodedSplit:
        return self.splits["train"]

    @property
    def val(self) -> EncodedSplit:
        return self.splits["val"]

    @property
    def test(self) -> EncodedSplit | None:
        return self.splits.get("test")


def write_split(out: Path, name: str, split: EncodedSplit, src_lang: str, tgt_lang: str) -> None:
    """{name}.pt, and {name}.{lang} when the split keeps its raw text."""
    atomic_write(out / f"{name}.pt", lambda f: torch.save(_flatten(split), f))
    if split.src_text is not None:
        for lang, lines in ((src_lang, split.src_text), (tgt_lang, split.tgt_text)):
            text = "".join(line + "\n" for line in lines)
            atomic_write(out / f"{name}.{lang}", lambda f, t=text: f.write(t.encode("utf-8")))


def write_info(out: Path, info: dict) -> None:
    """prepare.json, written last: a folder without it is not prepared (an interrupted prepare)."""
    text = json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n"
    atomic_write(out / INFO, lambda f: f.write(text.encode("utf-8")))


def begin_writing(out: Path, names: list[str]) -> None:
    """Mark `out` as being written, with the names of the files that will be: until
    `finish_writing`, the folder is not read, and the next prepare may replace those files."""
    text = json.dumps({"files": sorted(names)}, indent=2) + "\n"
    atomic_write(out / PARTIAL, lambda f: f.write(text.encode("utf-8")))


def finish_writing(out: Path) -> None:
    (out / PARTIAL).unlink()


def is_partial(path: Path) -> bool:
    """Whether a prepare stopped while writing `path`."""
    return (path / PARTIAL).exists()


def partial_names(path: Path) -> set[str]:
    """The files a prepare that stopped was writing into `path` (none if it did not stop there)."""
    try:
        names = json.loads((path / PARTIAL).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name in names if isinstance(name, str)}


def is_prepared(path: Path) -> bool:
    """Whether `path` holds a whole prepared folder."""
    return (path / INFO).is_file() and not is_partial(path)


def _flatten(split: EncodedSplit) -> dict[str, torch.Tensor]:
    """Ragged id lists as one flat int32 tensor plus offsets per side: compact, fast to load."""
    tensors = {}
    for side, rows in (("src", split.src), ("tgt", split.tgt)):
        lengths = torch.tensor([0] + [len(r) for r in rows], dtype=torch.int64)
        tensors[side] = torch.tensor([i for r in rows for i in r], dtype=torch.int32)
        tensors[f"{side}_offsets"] = lengths.cumsum(0)
    return tensors


def _unflatten(tensors: dict[str, torch.Tensor], side: str) -> list[list[int]]:
    flat, offsets = tensors[side].tolist(), tensors[f"{side}_offsets"].tolist()
    return [flat[a:b] for a, b in itertools.pairwise(offsets)]


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Read a folder written by `prepare`; never executes code from it (weights_only loads)."""
    path = Path(path)
    info_path = path / INFO
    if is_partial(path):
        raise QkvError(
            f"{path}: a qkv prepare stopped while writing it ({PARTIAL} is there): run qkv prepare "
            "again, which replaces what it left"
        )
    if not info_path.is_file():
        raise QkvError(f"{path} is not a prepared data folder (no prepare.json): run qkv prepare")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise QkvError(
            f"{info_path}: format version {info.get('format_version')}, this qkv reads "
            f"{FORMAT_VERSION}: run qkv prepare again"
        )
    tokenizer = Tokenizer.load(path / "tokenizer.model")
    splits = {}
    for name in info["splits"]:
        tensors = torch.load(path / f"{name}.pt", weights_only=True)
        src_file, tgt_file = (
            path / f"{name}.{lang}" for lang in (info["src_lang"], info["tgt_lang"])
        )
        src_text = tgt_text = None
        if src_file.is_file():
            src_text, tgt_text = map(list, zip(*read_parallel(src_file, tgt_file), strict=True))
        splits[name] = EncodedSplit(
            _unflatten(tensors, "src"), _unflatten(tensors, "tgt"), src_text, tgt_text
        )
    return PreparedData(path, tokenizer, info, splits)
