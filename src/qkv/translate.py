"""Text in, text out: a trained model, its tokenizer and the search, batched by token count.

>>> translator = qkv.load("runs/de_en")             # a run directory or a checkpoint file
>>> translator.translate(["Ein Hund läuft.", ""], beam=5)
['A dog is running.', '']

Sentences are sorted by length so each batch holds sentences of similar length (little padding), and the
translations come back in input order. An empty sentence translates to an empty string without running
the model; a sentence longer than the model's positions is cut to fit, with a warning naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkv.checkpoint import TOKENIZER, load_trained_model
from qkv.data import cut_into_batches
from qkv.errors import QkvError
from qkv.errors import warn as default_warn
from qkv.hardware import DTYPES, resolve_precision, usable_device
from qkv.inference import DecodingEngine, prepare_for_decoding, rowwise_int8
from qkv.inference.compiled import COMPILED, CompiledEngine
from qkv.inference.cuda_graphs import GraphedEngine
from qkv.inference.linear import Int8Unavailable, int8_engine_switch
from qkv.length_penalty import alpha_problem, length_penalty_factor
from qkv.model import Transformer
from qkv.search import beam_search, greedy_search
from qkv.tokenizer import Tokenizer


@dataclass
class Hypothesis:
    """One translation: its text, its subword ids (without EOS) and its score (log-probability over
    the length penalty, as `qkv.search.beam_search` ranks them)."""

    text: str
    score: float
    ids: list[int]


class Translator:
    """A model and its tokenizer, ready to translate lists of sentences.

    It prepares the model for decoding once (`qkv.inference.prepare_for_decoding`: on the CPU,
    oneDNN's packed copy of each matrix, as much memory again as the model's weights) and keeps that
    engine from one call to the next. ``translator.model.load_state_dict(...)`` drops it, so the next
    call prepares the new weights; after changing parameters any other way, call `refresh()`.

    precision: 'fp32', 'bf16', or 'auto' (bf16 where the device computes it natively, see
    `qkv.hardware`); the one chosen is `self.precision`. bf16 on a device without bf16 arithmetic
    warns once (through `warn`, default `warnings.warn`) and runs, many times slower. 'int8': the
    model stays fp32 and decoding multiplies by int8 weights (`qkv.inference.linear`; on the CPU);
    where PyTorch's quantised kernels do not run, it warns once and decodes in fp32.

    compile: decode batches of up to 5 rows (sentences x beams: one sentence with beam 5, or up to 5
    greedy), and greedy batches of up to 32 sentences of a small model (programs of 8, 16 or 32
    rows, then 16, 8, 4 or 1 as sentences finish; greedy on more sentences moves to them once 32
    are left), with a compiled decoder step (`qkv.inference.compiled`, fp32 on the CPU; 'auto'
    then means fp32; with 'int8', a compiled step whose products are the int8 engine's,
    `qkv.inference.int8_products`): 2.2-2.8x faster on one sentence of a small model, 1.2-1.5x of a
    base one, 1.0-1.16x on 32 sentences (benchmarks/README.md), at a one-time cost of ~20-40 s for
    each number of rows at its first use;
    the program is then kept on disk (`say` is told when it compiles). On a GPU, the same step is
    replayed as CUDA graphs (`qkv.inference.cuda_graphs`, fp32), recorded at first use. Where it
    cannot run, it says why once and decodes as without it."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        meta: dict | None = None,
        warn: Callable[[str], None] | None = None,
        compile: bool = False,
        say: Callable[[str], None] | None = None,
    ):
        int8 = precision == "int8"
        self.compile, self.say = compile, say
        # Where compiled programs are kept (None: qkv.inference.aoti.default_cache_dir()).
        self.compile_cache: Path | None = None
        if compile and precision == "auto":
            precision = "fp32"  # what the compiled step (CPU) and its CUDA graphs compute in
        self.precision = "int8" if int8 else resolve_precision(precision, device, warn)
        self.model = model.to(device=device, dtype=DTYPES["fp32" if int8 else self.precision])
        self.model.eval()
        self._warn = warn or _warn
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.meta = meta or {}  # what training recorded: dataset, src_lang, tgt_lang
        self._engine: DecodingEngine | None = None  # prepared at the first call, kept across calls
        self.model.register_load_state_dict_post_hook(lambda module, keys: self.refresh())

    def refresh(self) -> None:
        """Forget the engine prepared from the model's weights: the next call prepares it anew."""
        self._engine = None

    def engine(self) -> DecodingEngine:
        """The model prepared for decoding, kept from one call to the next."""
        if self._engine is None:
            with torch.inference_mode():
                if self.precision == "int8":
                    self._engine = self._int8_engine()
                if self._engine is None:  # fp32, bf16, or int8 where it does not run
                    self._engine = self._engine_in_model_precision()
        return self._engine

    def _engine_in_model_precision(self) -> DecodingEngine:
        if not self.compile:
            return prepare_for_decoding(self.model)
        # on a GPU, the same step replayed as CUDA graphs
        kind = GraphedEngine if self.device.type == "cuda" else CompiledEngine
        return kind(self.model, self._warn, cache_dir=self.compile_cache, say=self.say)

    def _int8_engine(self) -> DecodingEngine | None:
        """The int8 engine (compiled with `compile`), or None where int8 does not run here (said
        once): then fp32."""
        if self.device.type != "cpu":
            why = f"int8 decoding runs on the CPU, not {self.device.type}"
        else:
            try:
                if self.compile:
                    cache = self.compile_cache
                    engine = CompiledEngine(self.model, self._warn, cache, self.say, int8=True)
                else:
                    rowwise_int8.unavailable(self.say)  # its operators built first, `say` told
                    engine = prepare_for_decoding(self.model, int8=True)
                if self.say is not None and (switch := int8_engine_switch()) is not None:
                    self.say(switch)  # PyTorch's first engine failed here; another runs
                return engine
            except Int8Unavailable as error:
                why = str(error)
        self._warn(f"{why}: translating in fp32")
        self.precision = "fp32"
        return None

    @classmethod
    def load(
        cls,
        path: str | Path,
        tokenizer: str | Path | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        warn: Callable[[str], None] | None = None,
        compile: bool = False,
        say: Callable[[str], None] | None = None,
    ) -> Translator:
        """The model of a run directory (its best.pt, else last.pt) or of a checkpoint file, with the
        tokenizer.model beside it (or `tokenizer`, a path); a damaged best.pt gives way to the newest
        readable checkpoint, with a warning (`qkv.checkpoint.load_run_checkpoint`). precision,
        warn, compile and say: as for the class; compiled programs are kept in the folder `compiled`
        beside the checkpoint."""
        usable_device(device)
        if tokenizer is not None and not Path(tokenizer).exists():  # a file, or a folder with one
            raise QkvError(f"--tokenizer {tokenizer}: no such file")
        model, checkpoint_path, meta = load_trained_model(path, map_location=device, warn=warn)
        tokenizer_path = Path(tokenizer) if tokenizer else checkpoint_path.parent / TOKENIZER
        if not tokenizer_path.exists():
            raise QkvError(
                f"{checkpoint_path}: no {TOKENIZER} beside it: put the one the model was trained "
                "with there (qkv translate and evaluate also take --tokenizer PATH)"
            )
        tokenizer_model = Tokenizer.load(tokenizer_path)
        trained_with = model.config.tgt_vocab_size
        if {model.config.src_vocab_size, trained_with} != {tokenizer_model.vocab_size}:
            raise QkvError(
                f"{tokenizer_path}: {tokenizer_model.vocab_size} subwords, but {checkpoint_path} "
                f"was trained with {trained_with}: give the tokenizer it was trained with"
            )
        translator = cls(model, tokenizer_model, device, precision, meta, warn, compile, say)
        translator.compile_cache = checkpoint_path.parent / COMPILED
        return translator

    def translate(self, sentences: Sequence[str], beam: int = 5, **options) -> list[str]:
        """The best translation of each sentence, in input order. Options as `hypotheses` (scores
        are not computed where they need not be: see its `scores`)."""
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
        progress: bool | Any = False,
        warn: Callable[[str], None] | None = None,
        first_line: int = 1,
        scores: bool = True,
    ) -> list[list[Hypothesis]]:
        """The `n_best` best translations of each sentence (best first), in input order.

        beam: beam size (1: greedy search). max_tokens: source tokens per batch, padding included;
        more is faster up to a point and takes more memory (a batch decodes beam x its sentences
        rows). max_len, min_len: generated tokens, and early_exit, as in `qkv.search.beam_search`
        (a sentence ends when its best candidate does; fewer steps). An empty sentence gives one
        empty hypothesis with score 0. warn: called with a message for each sentence cut to the
        model's max_len (default: `warnings.warn`), which names its line: `first_line` is the line
        number of sentences[0]. progress: a progress bar of its own, or a tqdm bar to advance.
        scores=False: greedy search (beam 1) computes no log-probabilities, and each hypothesis's
        score is NaN (beam search needs them, and keeps its scores).
        """
        if not 1 <= n_best <= beam:
            raise QkvError(f"--n-best must be between 1 and the beam size {beam}, got {n_best}")
        if problem := alpha_problem(length_penalty):
            raise QkvError(f"--length-penalty {problem}")
        sources = self.encode(sentences, warn or _warn, first_line)
        results: list[list[Hypothesis]] = [[Hypothesis("", 0.0, [])] for _ in sentences]
        search = dict(
            beam=beam,
            n_best=n_best,
            length_penalty=length_penalty,
            length_penalty_style=length_penalty_style,
            max_len=max_len,
            min_len=min_len,
            early_exit=early_exit,
            scores=scores,
        )
        own_bar = isinstance(progress, bool)
        bar = _progress_bar(len(sentences), progress) if own_bar else progress
        bar.update(sum(1 for ids in sources if not ids))  # empty lines are done already
        engine = self.engine()
        for batch in token_batches(sources, max_tokens):
            hypotheses = self._search(engine, sources, batch, search)
            for index, sentence_hypotheses in zip(batch, hypotheses, strict=True):
                results[index] = sentence_hypotheses
            bar.update(len(batch))
        if own_bar:
            bar.close()
        return results

    def encode(
        self, sentences: Sequence[str], warn: Callable[[str], None], first_line: int = 1
    ) -> list[list[int]]:
        """Source ids of each sentence, EOS included; [] for an empty one. Too long ones are cut,
        with a warning naming the line (`first_line` is sentences[0]'s)."""
        config = self.model.config
        limit = config.max_len - 1  # room for EOS
        sources = []
        for number, sentence in enumerate(sentences, start=first_line):
            ids = self.tokenizer.encode(sentence) if sentence.strip() else []
            if len(ids) > limit:
                warn(
                    f"line {number}: {len(ids)} subword tokens, more than the model's "
                    f"{limit} (max_len {config.max_len} with EOS): translating the first {limit}"
                )
                ids = ids[:limit]
            sources.append([*ids, config.eos_id] if ids else [])
        return sources

    def _search(self, engine, sources, batch: list[int], search: dict) -> list[list[Hypothesis]]:
        config = self.model.config
        longest = max(len(sources[i]) for i in batch)
        src = torch.full((len(batch), longest), config.pad_id, dtype=torch.long)
        for row, index in enumerate(batch):
            src[row, : len(sources[index])] = torch.tensor(sources[index])
        src = src.to(self.device)
        if search["beam"] == 1:
            ids, scores = greedy_search(
                engine, src, search["max_len"], search["min_len"], scores=search["scores"]
            )
            if scores is None:  # not asked for: not computed
                scores = torch.full((ids.size(0),), math.nan, device=ids.device)
            # Greedy returns log-probabilities: normalise them as beam search does, so --scores
            # means one thing whatever the beam size.
            lengths = (ids != config.pad_id).sum(dim=1).clamp(min=1)
            penalty = length_penalty_factor(
                lengths.float(), search["length_penalty"], search["length_penalty_style"]
            )
            ids, scores = ids[:, None], (scores / penalty)[:, None]
        else:
            ids, scores = beam_search(
                engine,
                src,
                beam_size=search["beam"],
                length_penalty=search["length_penalty"],
                length_penalty_style=search["length_penalty_style"],
                max_len=search["max_len"],
                min_len=search["min_len"],
                n_best=search["n_best"],
                early_exit=search["early_exit"],
            )
        return [
            [self._hypothesis(ids[row, rank], scores[row, rank]) for rank in range(ids.size(1))]
            for row in range(len(batch))
        ]

    def _hypothesis(self, ids: torch.Tensor, score: torch.Tensor) -> Hypothesis:
        config = self.model.config
        tokens = [t for t in ids.tolist() if t not in (config.pad_id, config.eos_id)]
        return Hypothesis(self.tokenizer.decode(tokens), float(score), tokens)


def token_batches(sources: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of the non-empty sources, sorted by length, cut into batches of at most `max_tokens`
    source tokens counting padding (at least one sentence each), as training's batches are cut."""
    order = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: len(sources[i]))
    return cut_into_batches(order, [len(sources[i]) for i in order], max_tokens)


def _warn(message: str) -> None:
    default_warn(message, stacklevel=5)  # at the caller of `hypotheses`


def _progress_bar(total: int | None, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="sent", desc="translating", leave=False)
