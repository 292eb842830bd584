"""`qkv serve`: trained models behind an HTTP API that LibreTranslate's clients speak, batching the
sentences of concurrent requests into one search (`qkv.serve.batcher`, `qkv.serve.app`).

FastAPI, uvicorn and prometheus_client are the optional extra `qkv[serve]`, imported only here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qkv.errors import QkvError


def compile_ahead(translator, beam: int) -> int:
    """Compile now (or load from the run's compiled/ folder) every program of the compiled decoder
    step that a batch of requests with `beam` beams can run on (`CompiledEngine.sentences_per_program`:
    two with beam 5, for one sentence and for more; up to eight, from 1 to 32 sentences, with beam
    1), so that no client waits for a compile. Each translation makes two tokens at least, since
    the program for beams on many sentences runs from the second; with one beam, each runs with
    and without scores, as the server's searches do (`Service.translate`: qkv's API keeps them,
    LibreTranslate's does not; greedy search has a program for each where it screens its output
    product). Returns how many numbers of sentences; 0 for an engine without a
    compiled step."""
    from qkv.inference.compiled import CompiledEngine

    engine = translator.engine()
    if not isinstance(engine, CompiledEngine):
        return 0
    counts = engine.sentences_per_program(beam)
    for sentences in counts:
        for scores in (True, False) if beam == 1 else (True,):  # beams keep scores anyway
            translator.hypotheses(["."] * sentences, beam=beam, min_len=2, scores=scores)
    return len(counts)


def load_models(
    paths: Sequence[str],
    device: str = "cpu",
    precision: str = "auto",
    warn: Callable[[str], None] | None = None,
    compile: bool = False,
    say: Callable[[str], None] | None = None,
):
    """A `ServedModel` for each run directory or checkpoint, with the language pair its training
    recorded. A model that cannot be loaded, or two that serve one pair, is an error naming it.
    compile, say: as for `qkv.translate.Translator`."""
    from qkv.serve.service import ServedModel
    from qkv.translate import Translator

    models, pairs = [], {}
    for path in paths:
        translator = Translator.load(
            path, device=device, precision=precision, warn=warn, compile=compile, say=say
        )
        source, target = translator.meta.get("src_lang"), translator.meta.get("tgt_lang")
        if not source or not target:
            raise QkvError(
                f"{path}: the checkpoint does not record its languages (src_lang, tgt_lang)"
            )
        if (source, target) in pairs:
            raise QkvError(f"{path} and {pairs[source, target]} both translate {source}->{target}")
        pairs[source, target] = path
        models.append(ServedModel(str(path), translator, source, target))
    return models


def read_api_keys(path: str) -> set[str]:
    """One key a line; blank lines and lines starting with # are skipped."""
    from qkv.text import read_lines

    keys = {line.strip() for line in read_lines(path)}
    keys = {key for key in keys if key and not key.startswith("#")}
    if not keys:
        raise QkvError(f"{path}: no API keys in it (one a line)")
    return keys
