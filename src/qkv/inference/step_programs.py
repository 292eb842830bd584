"""The programs of a compiled decoder step (`StepPrograms`, a part of
`qkv.inference.compiled.CompiledEngine`): which step each kind of program and number of rows is
compiled from, where its package is kept, and loading or compiling it.

There are three kinds of program for a number of rows: beam search's (`BEAMS`: log-probabilities and
each row's most likely tokens, among which are a beam search's candidates), greedy search's
(`GREEDY`: the most likely token and the logits, no softmax), and, where greedy's screens its output
product (`StaticDecoderStep.screens`: wherever qkv's operators load), greedy's that computes every
logit (`GREEDY_EVERY_LOGIT`), for a search that keeps scores. Each is a package of its own.

A program is compiled at its first use (~20-40 s for a small model: half of it measuring the
products) and saved as a package (`decoder-step-R-rows[-greedy[-logits]]-KEY.pt2`) in the engine's
`cache_dir`: the run directory's `compiled/` folder (`qkv.inference.compiled.COMPILED`) when the
model comes from one (`Translator.load`), else `QKV_COMPILE_CACHE` or ~/.cache/qkv/compiled. KEY
hashes the weights, the configuration, the code the step is traced from, PyTorch, the CPU's
capability and the threads, so a package is only loaded where it was made for (~5 ms). Options,
key, compiling: `qkv.inference.aoti`.
"""

from __future__ import annotations

import time
from pathlib import Path

from qkv.inference import aoti, int8_products, native, packed_linear
from qkv.inference.packed_linear import DecoderProducts, ScreenedRows
from qkv.inference.static_step import StaticDecoderStep, compile_package

BEAMS, GREEDY, GREEDY_EVERY_LOGIT = 0, 1, 2  # the kinds of program for a number of rows
KIND_SUFFIXES = ("", "-greedy", "-greedy-logits")  # in their packages' names
KIND_WORDS = ("", ", greedy", ", greedy with every logit")  # in the lines that say it compiles


class StepPrograms:
    """The programs of an engine's step, by (rows, kind). Its engine holds `static_step` and
    `greedy_step` (`StaticDecoderStep`), `digests`, `cache_dir`, `say` and `int8`, and calls
    `_init_programs` once they are set."""

    # Its programs' beam candidates and greedy best tokens by qkv's operators where they load
    # (`topk.log_softmax_topk`, `topk.row_topk`, `topk.biased_argmax`)
    NATIVE_CANDIDATES = True

    def _init_programs(self) -> None:
        self.programs: dict[tuple[int, int], object] = {}  # (rows, kind) -> the loaded program
        # (rows, kind) -> seconds to compile or load it
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self._keys: dict[bool, str] = {}  # whether a step takes qkv's products -> its key
        # The steps with qkv's products, one for each kind of program (`packed_steps`); [] where they
        # do not serve
        self._packed_steps: list[StaticDecoderStep] | None = None
        self._products: DecoderProducts | bool | None = None  # False: they do not serve here
        self._native_topk: bool | None = None  # decided at the first program (`step_module`)
        self._kinds_with_scores: dict[int, int] = {}  # rows -> greedy's kind then (`greedy_kind`)
        # Greedy's step that computes every logit where `greedy_step` screens (`_step_of`)
        self._greedy_every_logit: StaticDecoderStep | None = None
        self._screened_rows: ScreenedRows | None = None  # `screened_rows`

    @property
    def compiled_rows(self) -> set[int]:
        return {rows for rows, _ in self.programs}

    def package_path(self, rows: int, kind: int = BEAMS) -> Path:
        """Where the program of `rows` rows of this `kind` (`BEAMS`, `GREEDY`, ...) is kept."""
        step = self.step_module(BEAMS, rows)  # the key: of the kind of step (products) for `rows`
        if step.native not in self._keys:
            self._keys[step.native] = aoti.program_key(step, self.digests)
        suffix = KIND_SUFFIXES[kind]
        return self.cache_dir / f"decoder-step-{rows}-rows{suffix}-{self._keys[step.native]}.pt2"

    def program(self, arguments: tuple, kind: int = BEAMS) -> object:
        """The program of this `kind` (`BEAMS`, `GREEDY`, `GREEDY_EVERY_LOGIT`) for this number of
        rows: loaded, from the cache, or compiled and saved."""
        rows = arguments[0].size(0)
        if (rows, kind) not in self.programs:
            started = time.perf_counter()
            what = f"the decoder step for {rows} row{'s' if rows > 1 else ''}"
            self.programs[rows, kind] = aoti.load_or_compile(
                self.package_path(rows, kind),
                lambda path: compile_package(self.step_module(kind, rows), arguments, path),
                what + KIND_WORDS[kind],
                self.say,
            )
            self.compile_seconds[rows, kind] = time.perf_counter() - started
        return self.programs[rows, kind]

    def step_module(self, kind: int = BEAMS, rows: int | None = None) -> StaticDecoderStep:
        """The step a program of this `kind` and `rows` rows is compiled from, and what runs when it
        cannot be: with qkv's products where they serve programs of that many rows
        (`packed_linear.serves`, `packed_steps`); int8, always with its int8 products."""
        self._candidates_natively()
        return self._step_of(kind, rows)

    def _step_of(self, kind: int, rows: int | None) -> StaticDecoderStep:
        takes_products = rows is not None and packed_linear.serves(rows)
        if (self.int8 or takes_products) and self.packed_steps():
            return self._packed_steps[kind]
        if kind == GREEDY_EVERY_LOGIT:
            if self._greedy_every_logit is None:
                self._greedy_every_logit = self.greedy_step.every_logit()
            return self._greedy_every_logit
        return self.greedy_step if kind == GREEDY else self.static_step

    def greedy_kind(self, rows: int, scores: bool) -> int:
        """The kind of program greedy search takes on `rows` rows: `GREEDY`, or where that one
        screens its output product and the search keeps scores, `GREEDY_EVERY_LOGIT`."""
        if not scores:
            return GREEDY
        if rows not in self._kinds_with_scores:  # decided once: a step's few µs
            self._candidates_natively()  # whether qkv's operators serve, which screening needs
            screens = self._step_of(GREEDY, rows).screens(rows)
            self._kinds_with_scores[rows] = GREEDY_EVERY_LOGIT if screens else GREEDY
        return self._kinds_with_scores[rows]

    def _candidates_natively(self) -> None:
        """At the first question: whether the steps find their candidates with qkv's operator
        (where it loads, `NATIVE_CANDIDATES`), so that their programs do."""
        if self._native_topk is None:
            self._native_topk = self.NATIVE_CANDIDATES and native.load(self.say) is None
            for step in (self.static_step, self.greedy_step, *(self._packed_steps or [])):
                step.native_topk = self._native_topk
            model = self.greedy_step.model
            if self._native_topk and not self.int8 and packed_linear.unavailable(model) is None:
                # Greedy programs of many rows screen their output product by qkv's operators,
                # whatever their other products (`StaticDecoderStep.screens`)
                self.greedy_step.screen = self.screened_rows()

    def screened_rows(self) -> ScreenedRows:
        """The output's screen for many rows, made once for every step that screens (qkv's products'
        output shares it): where qkv's operators load."""
        if self._screened_rows is None:
            output = self.static_step.model.output
            self._screened_rows = ScreenedRows(output.weight, output.bias)
        return self._screened_rows

    def packed_steps(self) -> bool:
        """Whether the steps with qkv's products serve here: made at the first question."""
        if self._packed_steps is None:
            products, steps = self.decoder_products(), (self.static_step, self.greedy_step)
            self._packed_steps = (
                [s.with_products(products) for s in steps] if products is not None else []
            )
            if self._packed_steps:  # GREEDY_EVERY_LOGIT's
                self._packed_steps.append(self._packed_steps[GREEDY].every_logit())
        return bool(self._packed_steps)

    def decoder_products(self) -> DecoderProducts | None:
        """The decoder's products by qkv's kernel, made once, or None where they do not serve
        (`packed_linear.unavailable`): for the programs it serves (`packed_linear.serves`). An int8
        engine's are int8 (`qkv.inference.int8_products`)."""
        if self._products is None and self.int8:
            self._products = int8_products.int8_products(self)
        if self._products is None:
            usable = packed_linear.unavailable(self.static_step.model, self.say) is None
            self._products = (
                DecoderProducts.of_step(self.static_step, self.screened_rows()) if usable else False
            )
        return None if self._products is False else self._products

    def beam_products(self) -> DecoderProducts | None:
        """The products a beam program takes: int8 ones for an int8 engine, else qkv's where they
        serve beams on many sentences (`packed_linear.serves`), else None (PyTorch's)."""
        if self.int8 or packed_linear.serves(None):
            return self.decoder_products()
        return None

    def measured_beam_products(self) -> DecoderProducts | None:
        """qkv's products for a beam program where it takes them only as they measure against
        oneDNN's here (`packed_linear.measures_beams`: fp32), else None."""
        if not self.int8 and packed_linear.measures_beams():
            return self.decoder_products()
        return None
