"""A decoder step with no Python in it, for batches of a few rows (one sentence at a time).

At batch 1 the eager engine's step is ~240 small PyTorch operators, and its products of one row by a
matrix (oneDNN's packed call, ~15 µs each at 256 x 256 where the arithmetic takes ~3) cost more than
the arithmetic: CTranslate2 decoded a sentence 2x faster. Here the step is one program of compiled
C++, made by PyTorch's AOTInductor (`torch.export`, then `aoti_compile_and_package`) for a fixed
number of rows:

- the cache (`StaticCache`, `qkv.inference.static_cache`) has fixed shapes: keys and values of every
  layer in one tensor (2, layers, rows, heads, capacity, d_head), 8 positions at first, doubled when
  full; a slot not written yet is zero and masked out (-inf). The program attends to the slots
  before the step's position and to the new keys and values, and at its end writes every layer's
  new keys and values into their slot (`static_cache.write_new_slot`: one kernel that writes the
  slot only; written layer by layer as each made them, Inductor had copied the whole cache at every
  layer). Returning them for the engine to write cost ~30 µs of calls a step (one sentence, beam
  5); CUDA graphs' steps still do (`STEPS_WRITE_CACHE`). A reorder of the beams moves nothing: the
  program gathers each row's slots from where its ancestors wrote them;
- the encoder's keys and values are projected once per search, padded to a multiple of 8 positions
  (the padding masked out);
- the program ends with what the searches do first (`NextToken`): the log-softmax, the banned ids
  set to -inf (an input of 0 / -inf per id), and the most likely token of each row with its
  log-probability (~25 µs of operator calls a step fewer, at one sentence), and each row's
  2 x `MAX_ROWS` most likely with theirs, among which are a beam search's candidates
  (`NextToken.best_extensions`; their search over every row took ~140 µs a step of one sentence
  right after the program, 2.5-6% of a search). Greedy search has a
  program of its own (`GREEDY`), which returns the most likely token and the logits, and no
  softmax: a search that keeps scores takes it after the program, in place (as fast as inside),
  one that does not (`greedy_search(scores=False)`, `qkv translate` without `--scores`) never
  computes it. Where qkv's operators load, that program finds the tokens by screening the
  output product (`StaticDecoderStep.screens`); a search there that keeps scores takes a third
  program, `GREEDY_EVERY_LOGIT` (`qkv.inference.step_programs`). It reads each row's keys and
  values where they are: with one beam per sentence, the cache keeps each sentence in its row;
- the weights are constants of the program, and its matrix products are Inductor's own C++ kernels,
  chosen by measuring them against the library's (``max_autotune`` with the CPP backend: packed
  weights, the bias and ReLU fused); from 32 rows, oneDNN's (`aoti.LIBRARY_PRODUCTS_FROM_ROWS`), but
  Inductor's for small weights on AVX2 (`aoti.own_products_up_to`), chosen by size; qkv's own
  kernel in every program on AVX2, and on AVX-512 in all but the beam programs of many sentences
  (`packed_linear.serves`).
  The capacity and the source length are dynamic: one program per number of rows.

A program is compiled at its first use (~20-40 s for a small model) and kept as a package in the
engine's `cache_dir` (the run directory's `compiled/` folder, `COMPILED`), loaded in ~5 ms from then
on: `qkv.inference.step_programs`.

`CompiledEngine` is `qkv.inference.DecodingEngine` with this step for batches of up to `MAX_ROWS` rows
(sentences x beams: beam 5 on one sentence), and of up to 32 sentences with one beam each (greedy,
sampling; rows rounded up to 8, 16 or 32, and fewer as sentences finish: `qkv.inference.buckets`),
on the CPU in fp32; beams on two sentences or more take a program of their own over the eager step's
cache from their second step (`qkv.inference.beam_program`); larger greedy batches, other devices
and dtypes take the eager step (greedy search on more sentences hands over to the programs once 32
are left: `StaticCache.take_over`). One sentence's
encoder is a program too, with the first step's projection (its products qkv's kernel's where it
loads), and so is the encoder of many sentences where the beam program is taken
(`qkv.inference.compiled_encoder`). The
search (`qkv.search`) is the same. Where a program cannot be made (no C++ compiler, an unsupported
platform), the same step runs uncompiled for that search and the engine says so once, then uses the
eager step and encoder.

With `int8=True` (`--precision int8 --compile`) it is the eager int8 engine (`qkv.inference.linear`)
with the same programs of 1-5 rows and of 8, 16 or 32 greedy rows, every product in them the int8
engine's own kernel on its packed weights (`qkv.inference.int8_products`, through qkv's operators:
without them, the eager int8 step; qkv's own int8 kernel, `rowwise_int8`), one
sentence's encoder program and the beam programs with int8 products; the encoder of several
sentences stays the eager int8 engine's.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from qkv.inference import aoti, buckets, int8_products, native, packed_linear
from qkv.inference.beam_cache import BeamCache
from qkv.inference.beam_program import BeamPrograms
from qkv.inference.buckets import MAX_ROWS, ONE_BEAM_ROWS
from qkv.inference.compiled_encoder import SourceEncoder
from qkv.inference.digests import TensorDigests
from qkv.inference.engine import DecodingEngine, log_softmax, without
from qkv.inference.static_cache import StaticCache, position_input
from qkv.inference.static_step import StaticDecoderStep, compiled_step_unavailable
from qkv.inference.step_programs import BEAMS, StepPrograms
from qkv.inference.topk import extensions_of_rows
from qkv.model import Transformer

COMPILED = "compiled"  # the folder of a run directory that keeps its compiled programs


class CompiledEngine(StepPrograms, DecodingEngine):
    """`DecodingEngine` whose step is compiled (`StaticDecoderStep`) for batches of up to `MAX_ROWS`
    rows, or of up to 32 sentences with one beam each (`program_rows`). `warn` says once why the
    compiled step is not taken, if it is not; `cache_dir` keeps the compiled programs (default
    `aoti.default_cache_dir()`; `StepPrograms`: `program`, `package_path`, `step_module`); `say`,
    if given, is told when a program is compiled (it takes a while) and where it is kept."""

    MAKES = "compile {}"  # what it does to a step, for the line that says it could not
    STEPS_WRITE_CACHE = True  # its programs write the cache's keys and values themselves

    def __init__(
        self,
        model: Transformer,
        warn=warnings.warn,
        cache_dir: str | Path | None = None,
        say=None,
        int8: bool = False,
    ):
        super().__init__(model, int8)  # int8: `Int8Unavailable` where PyTorch's kernels do not run
        self.warn, self.say = warn, say
        self.cache_dir = Path(cache_dir) if cache_dir else aoti.default_cache_dir()
        aoti.measures_products()  # a bad QKV_COMPILE_AUTOTUNE is an error here, not a failed compile
        self.unavailable = self.why_unavailable(model)
        self.digests = TensorDigests()  # of the weights, for its programs' keys
        # A beam search's candidates: 2 x beam per sentence, and a program has at most MAX_ROWS beams.
        self.static_step = StaticDecoderStep(
            model, candidates=2 * MAX_ROWS, writes_cache=self.STEPS_WRITE_CACHE
        ).eval()
        self.greedy_step = StaticDecoderStep(
            model, greedy=True, like=self.static_step, writes_cache=self.STEPS_WRITE_CACHE
        ).eval()
        # Beams on two sentences or more, over the eager step's cache (`BeamPrograms.takes`), where
        # measured: on `buckets.WIDE_VECTORS` (elsewhere, Arm, the eager step)
        self.beam_programs = BeamPrograms(
            model,
            self.cache_dir,
            self.static_step,
            say,
            products=self.beam_products,
            digests=self.digests,
            measured=self.measured_beam_products,
        )
        self.compiles_beams = buckets.wide_vectors()
        # One sentence's encoder compiled, and the first step's cross-attention K and V; where
        # beams on many sentences are compiled, many sentences' encoder too
        self.source = (
            SourceEncoder(
                model,
                self.cache_dir,
                say,
                batches=self.compiles_beams and not int8,  # int8: many sentences' eager int8
                products=int8_products.EncoderProducts(self) if int8 else None,
                digests=self.digests,
                own_products=None
                if int8
                else functools.partial(packed_linear.encoder_products, say=say),
            )
            if not self.unavailable
            else None
        )
        # What a step reads: the decoder's weights and the output projection (its stacked Q/K/V
        # weights are counted once, as the program holds them).
        decoder_weights = [*model.decoder.parameters(), model.output.weight]
        self.step_bytes = sum(p.numel() * p.element_size() for p in decoder_weights)
        self._init_programs()
        self._banned_biases: dict[tuple[int, ...], Tensor] = {}
        self._zero_scores: dict[int, Tensor] = {}  # rows -> zeros (`_no_beam_scores`)
        if self.unavailable is not None:
            warn(f"{self.unavailable}: decoding takes the eager step")

    def why_unavailable(self, model: Transformer) -> str | None:
        """None if this engine's step can serve `model` here, else why not (one line); int8 needs
        qkv's operators too (`qkv.inference.int8_products`)."""
        if (why := compiled_step_unavailable(model)) is not None or not self.int8:
            return why
        if (why := native.load(self.say)) is not None:
            return f"the compiled int8 step calls qkv's operators, not available here: {why}"
        return None

    def new_cache(
        self, max_beams: int = 1, max_len: int | None = None, sentences: int | None = None
    ) -> BeamCache | StaticCache:
        """A `StaticCache` for `sentences` x `max_beams` rows (`program_rows`) while the compiled
        step works; else the eager engine's `BeamCache`. With one beam on more sentences than a
        program has rows, a `StaticCache` that starts on the eager step (its `fallback`) and hands
        the search over to the programs once the live sentences fit one (`_takes_static_step`)."""
        rows = None if sentences is None else self.program_rows(sentences, max_beams)
        max_len = max_len or self.config.max_len
        if self.unavailable is None and rows is not None:
            fewer = self.fewer_rows(rows) if max_beams == 1 else ()
            return StaticCache(len(self.decoder), rows, max_beams, max_len, fewer)
        most = ONE_BEAM_ROWS[-1]
        hands_over = sentences is not None and max_beams == 1 and self.unavailable is None
        if hands_over and self.program_rows(most, 1) == most:
            cache = StaticCache(len(self.decoder), most, 1, max_len)
            cache.fallback, cache.hands_over = super().new_cache(1, max_len), True
            return cache
        return super().new_cache(max_beams, max_len)

    def many_rows_gain(self) -> bool:
        """Whether programs of more than one row gain for this model here (`qkv.inference.buckets`)."""
        return buckets.many_rows_gain(self.step_bytes)

    def program_rows(self, sentences: int, max_beams: int) -> int | None:
        """The rows of the program that decodes `sentences` x `max_beams` rows, or None: the eager
        step (`buckets.program_rows`)."""
        return buckets.program_rows(sentences, max_beams, self.many_rows_gain())

    def fewer_rows(self, rows: int) -> tuple[int, ...]:
        """The programs that a search with one beam per sentence on `rows` rows moves to as its
        sentences finish (`buckets.fewer_rows`)."""
        return buckets.fewer_rows(rows, self.many_rows_gain())

    def sentences_per_program(self, max_beams: int) -> list[int]:
        """For each program that a search with `max_beams` beams can run on, the fewest sentences
        that run it, smallest first ([] where nothing compiles): what a server translates before it
        listens, so that no request waits for a compile (`buckets.sentences_per_program`)."""
        if self.unavailable is not None:
            return []
        return buckets.sentences_per_program(max_beams, self.many_rows_gain(), self.compiles_beams)

    def step(self, last_tokens: Tensor, memory: Tensor, src_mask: Tensor, cache) -> Tensor:
        """As `DecodingEngine.step`; over a `StaticCache` the logits come normalised (they are the
        log-probabilities: the same softmax)."""
        if not self._takes_static_step(cache, last_tokens, memory, src_mask):
            return super().step(last_tokens, memory, src_mask, _eager_cache(cache))
        return self._static_step(last_tokens, cache, ())[0][:, None]

    def next_log_probs(
        self, last_tokens: Tensor, memory, src_mask, cache, banned: tuple[int, ...] = ()
    ) -> Tensor:
        if self.unavailable is None and self.compiles_beams and BeamPrograms.takes(cache):
            return self._beam_step(last_tokens, cache, banned)
        if not self._takes_static_step(cache, last_tokens, memory, src_mask):
            eager = _eager_cache(cache)
            return super().next_log_probs(last_tokens, memory, src_mask, eager, banned)
        return self._static_step(last_tokens, cache, banned)[0]

    def next_best(
        self,
        last_tokens: Tensor,
        memory,
        src_mask,
        cache,
        banned: tuple[int, ...] = (),
        scores: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._takes_static_step(cache, last_tokens, memory, src_mask):
            eager = _eager_cache(cache)
            return super().next_best(last_tokens, memory, src_mask, eager, banned, scores)
        # One beam per sentence keeps each row's history in its row (StaticCache.reorder).
        greedy = cache.max_beams == 1
        _, best, best_log_probs = self._static_step(last_tokens, cache, banned, greedy, scores)[:3]
        return best, best_log_probs

    def best_extensions(
        self,
        last_tokens: Tensor,
        memory,
        src_mask,
        cache,
        banned: tuple[int, ...],
        beam_scores: Tensor,
        k: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """As `NextToken.best_extensions`; over a `StaticCache`, from each row's most likely
        tokens, which the program finds (`StaticDecoderStep`'s candidates)."""
        if k <= self.static_step.candidates and self._takes_static_step(
            cache, last_tokens, memory, src_mask
        ):
            # One sentence whose beams fill the program's rows: the program's own extensions
            # (every step of a beam search on one sentence but the first, which has one beam).
            one_sentence = beam_scores.shape == (1, cache.rows) and cache.live_rows is None
            scores = beam_scores.reshape(-1).contiguous() if one_sentence else None
            outputs = self._static_step(last_tokens, cache, banned, beam_scores=scores)
            if one_sentence:  # best first: the k best are the first k (all of them, as beams ask)
                extensions = outputs[5:]
                if k == extensions[0].size(1):
                    return extensions
                return tuple(extension[:, :k] for extension in extensions)
            return extensions_of_rows(outputs[3], outputs[4], beam_scores, k)
        return super().best_extensions(last_tokens, memory, src_mask, cache, banned, beam_scores, k)

    def _takes_static_step(self, cache, last_tokens: Tensor, memory, src_mask) -> bool:
        """Whether this step runs over a `StaticCache` (started at the first step, or taken over
        from the eager step once the search's rows fit a program); if not, the eager step runs on
        `_eager_cache(cache)`."""
        if not isinstance(cache, StaticCache):
            return False
        if cache.fallback is not None:
            if not cache.hands_over or self.unavailable is not None:
                return False
            rows = self.program_rows(last_tokens.numel(), 1)
            return rows is not None and cache.take_over(rows, self.fewer_rows(rows))
        return cache.self_kv is not None or self._start(cache, memory, src_mask)

    def _static_step(
        self,
        last_tokens: Tensor,
        cache: StaticCache,
        banned: tuple[int, ...],
        greedy: bool = False,
        scores: bool = True,
        beam_scores: Tensor | None = None,
    ):
        """(rows,) the newest tokens -> the next token's log-probabilities (rows, vocab; None with
        `greedy`), its most likely one and that one's log-probability (rows,; None with `greedy`
        and not `scores`), and without `greedy` the most likely ones and theirs (rows,
        `StaticDecoderStep.candidates`) and the extensions of one sentence whose beams are the
        program's rows, with `beam_scores` (rows,) their scores (else the extensions mean nothing),
        from the program (`StaticDecoderStep`)."""
        cache.make_room()
        tokens = cache.program_tokens(last_tokens)  # contiguous (the search's is a column of ids)
        position = position_input(cache.length, cache.self_kv.device)
        banned_bias = self._banned_bias(banned)
        if beam_scores is None:
            beam_scores = self._no_beam_scores(cache.rows)
        arguments = (
            tokens, position, cache.self_kv, cache.ancestry, cache.cross_kv, cache.cross_bias,
            banned_bias, beam_scores,
        )  # fmt: skip
        kind = self.greedy_kind(tokens.size(0), scores) if greedy else BEAMS
        outputs = None
        if self.unavailable is None:
            try:
                outputs = self.program(arguments, kind)(*arguments)
            except Exception as error:  # export's and Inductor's failures have many types
                self._cannot_compile("the decoder step", error)
        if outputs is None:  # PyTorch's products once a program failed: they were not the cause
            rows = tokens.size(0) if self.unavailable is None else None
            outputs = self.step_module(kind, rows)(*arguments)
        if self.STEPS_WRITE_CACHE:
            cache.written()
        else:  # this position's keys and values, in each layer's output
            cache.write(outputs[-len(self.decoder) :])
            outputs = outputs[: -len(self.decoder)]
        if not greedy:  # log-probabilities, best token and its, most likely tokens and theirs
            return *(cache.search_rows(output) for output in outputs[:5]), *outputs[5:]
        best, logits = cache.search_rows(outputs[0]), outputs[1]
        if not scores:  # `logits` may be a screening step's final hidden state (`GREEDY`)
            return None, best, None
        # The softmax only now, in place on the program's own logits (as fast as inside it).
        log_probs = log_softmax(cache.search_rows(logits))
        return None, best, log_probs.gather(1, best[:, None]).squeeze(1)

    def _beam_step(self, last_tokens: Tensor, cache: BeamCache, banned: tuple[int, ...]) -> Tensor:
        """A position of beam search on many sentences (`qkv.inference.beam_program`); the eager
        step's from now on if its program fails to compile or run here (said once)."""
        try:
            return self.beam_programs.next_log_probs(last_tokens, cache, banned)
        except Exception as error:  # export's and Inductor's failures have many types
            self._cannot_compile("the beam step", error)
        return super().next_log_probs(last_tokens, None, None, cache, banned)

    def _cannot_compile(self, what: str, error: Exception) -> None:
        """Say once that `what` failed to compile or run here; from now on decoding is eager."""
        self.unavailable = self._could_not(what, error)
        self.warn(f"{self.unavailable}: decoding takes the eager step")

    def _could_not(self, what: str, error: Exception) -> str:
        """The line that says `what` failed to compile (or be recorded) here, and why."""
        return f"PyTorch could not {self.MAKES.format(what)} here ({_why(error)})"

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """As `DecodingEngine.encode`, through a compiled program (`qkv.inference.compiled_encoder`:
        one sentence's, or many sentences'), until one fails to compile or run (said once). Where
        the C++ compiler itself failed, the whole engine is eager from then on, in that one line:
        the decoder's programs need the same compiler, and would fail again after another compile
        and say so in another line; another failure leaves the decoder's programs to it."""
        if self.unavailable is None and self.source.takes(src_ids):
            try:
                return self.source(src_ids), self.model.src_mask(src_ids)
            except Exception as error:  # export's and Inductor's failures have many types
                self.source.unavailable = self._could_not("the encoder", error)
                if _compiler_failed(error):  # the compiler every program needs: one line for all
                    self._cannot_compile("the encoder", error)
                else:
                    self.warn(f"{self.source.unavailable}: encoding takes the eager encoder")
        return super().encode(src_ids)

    def _banned_bias(self, banned: tuple[int, ...]) -> Tensor:
        """(vocab,) -inf at the `banned` ids, else 0: made once for each set of ids."""
        bias = self._banned_biases.get(banned)
        if bias is None:
            with torch.inference_mode(False):  # kept across calls, in and out of inference mode
                zeros = torch.zeros(
                    1, self.config.tgt_vocab_size, device=self.model.output.weight.device
                )
                bias = without(zeros, banned)[0]
            self._banned_biases[banned] = bias
        return bias

    def _no_beam_scores(self, rows: int) -> Tensor:
        """(rows,) zeros: the beam scores of a step whose extensions are not asked for (made once
        for each number of rows)."""
        if rows not in self._zero_scores:
            with torch.inference_mode(False):  # kept across calls, in and out of inference mode
                device = self.model.output.weight.device
                self._zero_scores[rows] = torch.zeros(rows, device=device)
        return self._zero_scores[rows]

    def _start(self, cache: StaticCache, memory: Tensor, src_mask: Tensor) -> bool:
        """Project the encoder output for cross-attention and allocate the cache (the first step).
        False when a source has no token at all (its attention would be NaN with an additive mask):
        then this search takes the eager step, whose reference formula covers it."""
        if src_mask is not None and not bool(src_mask.any(dim=-1).all()):
            cache.fallback = BeamCache(len(self.decoder), cache.max_beams, cache.max_capacity)
            return False
        cache.set_source(self.source.cross_kv(memory), src_mask, self.config.n_heads)
        config = self.config
        shape = (2, len(self.decoder), cache.rows, config.n_heads, cache.capacity, config.d_head)
        cache.start(memory.new_zeros(shape))
        return True


# A compiler's own error line in Inductor's message: "vec_float.h:196:61: internal compiler error: ..."
_COMPILER_ERROR = re.compile(r"([^/\s]+:\d+(?::\d+)?: (?:fatal |internal compiler )?error: .*)")


def _why(error: Exception) -> str:
    """One line: the error's type, its first line and, where a C++ compiler failed (Inductor's
    CppCompileError, whose first line says only that), the compiler's first error, its file named
    without the folders. On an aarch64 Debian 12, GCC 12 crashed on PyTorch's SVE header
    ("vec_float.h:196:61: internal compiler error: Segmentation fault", session 52)."""
    text = str(error)
    first = (text.splitlines() or [""])[0][:200]
    compiler = _COMPILER_ERROR.search(text)
    if compiler is not None and compiler.group(1) not in first:
        first += f"; {compiler.group(1).strip()[:200]}"
    return f"{type(error).__name__}: {first}"


def _compiler_failed(error: Exception) -> bool:
    """Whether `error` is the C++ compiler's own failure (Inductor's CppCompileError, or a compiler
    error in its message), which every program compiled here would meet."""
    return type(error).__name__ == "CppCompileError" or bool(_COMPILER_ERROR.search(str(error)))


def _eager_cache(cache):
    """The cache the eager step runs on: a `StaticCache`'s fallback, or the cache itself."""
    return cache.fallback if isinstance(cache, StaticCache) else cache
