"""The rules every value of a run config follows, checked when the config is read: before any data is
prepared or any folder made, a bad value is one error that names the key, the value and the rule
(``model.d_model must be a positive multiple of model.n_heads (4), not -8``); `load_config` adds
the file or the --set that gave it."""

from __future__ import annotations

import math
import re

from qkv.config import Config
from qkv.errors import QkvError
from qkv.hardware import PRECISIONS
from qkv.layers import ACTIVATIONS
from qkv.model import PRESETS
from qkv.prepare import DATASETS
from qkv.tokenizer import MIN_VOCAB_SIZE, MODEL_TYPES

LR_SCHEDULES = ("noam", "inverse_sqrt", "cosine")
SUBWORD_DROPOUT_SIDES = ("both", "source")
POSITIONALS = ("sinusoidal", "learned")


def check_config(config: Config) -> None:
    """Raise a QkvError for the first value of `config` that breaks its rule."""
    _check_model(config)
    _check_data(config)
    _check_train(config)
    _check_eval(config)


def _check_model(config: Config) -> None:
    model = config.model
    _choice("model.preset", model.preset, PRESETS)
    # The preset's values with the section's overrides: what the model will be built with.
    values = {**PRESETS[model.preset], **{k: v for k, v in vars(model).items() if v is not None}}
    n_heads = values["n_heads"]
    _at_least("model.n_heads", n_heads, 1)
    d_model = values["d_model"]
    if not (d_model > 0 and d_model % n_heads == 0):
        _fail("model.d_model", d_model, f"a positive multiple of model.n_heads ({n_heads})")
    for key in ("d_ff", "n_encoder_layers", "n_decoder_layers"):
        _at_least(f"model.{key}", values[key], 1)
    for key in ("dropout", "attention_dropout"):
        if key in values:
            _probability(f"model.{key}", values[key])
    if model.max_len is not None:
        _at_least("model.max_len", model.max_len, 1)
    if model.positional is not None:
        _choice("model.positional", model.positional, POSITIONALS)
    if model.activation is not None:
        _choice("model.activation", model.activation, ACTIVATIONS)


def _check_data(config: Config) -> None:
    data = config.data
    if data.dataset is not None:
        _choice("data.dataset", data.dataset, DATASETS)
    _choice("data.tokenizer_type", data.tokenizer_type, MODEL_TYPES)
    if data.vocab_size is not None:
        _at_least("data.vocab_size", data.vocab_size, MIN_VOCAB_SIZE)
    _at_least("data.max_len", data.max_len, 1)
    prepared_here = not data.prepared and (
        data.trainpref or data.dataset not in (None, "synthetic")
    )
    if prepared_here and not (data.src_lang and data.tgt_lang):
        raise QkvError(
            "data.src_lang and data.tgt_lang: name both languages of the data (e.g. 'de', 'en')"
        )
    _seed("data.seed", data.seed)
    _probability("data.subword_dropout", data.subword_dropout)
    _choice("data.subword_dropout_side", data.subword_dropout_side, SUBWORD_DROPOUT_SIDES)


def _check_train(config: Config) -> None:
    train = config.train
    for key in ("max_steps", "max_epochs", "threads", "save_every"):
        _at_least(f"train.{key}", getattr(train, key), 0)
    for key in ("max_tokens", "pad_multiple", "update_freq", "warmup_steps", "keep_last"):
        _at_least(f"train.{key}", getattr(train, key), 1)
    _at_least("train.log_every", train.log_every, 1)
    _seed("train.seed", train.seed)
    for key in ("max_hours", "weight_decay", "clip_norm"):
        value = getattr(train, key)
        if not (math.isfinite(value) and value >= 0):
            _fail(f"train.{key}", value, "a finite number of at least 0")
    for key in ("lr", "adam_eps"):
        value = getattr(train, key)
        if not (math.isfinite(value) and value > 0):
            _fail(f"train.{key}", value, "a finite number above 0")
    _choice("train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
    if train.lr_schedule == "cosine" and train.max_steps <= 0:
        _fail("train.max_steps", train.max_steps, "above 0 with train.lr_schedule = 'cosine'")
    betas = train.adam_betas
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        _fail("train.adam_betas", betas, "two numbers in [0, 1), like [0.9, 0.98]")
    _probability("train.label_smoothing", train.label_smoothing)
    _choice("train.precision", train.precision, PRECISIONS)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", train.device):
        _fail("train.device", train.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")


def _check_eval(config: Config) -> None:
    evaluation = config.eval
    for key in ("every_steps", "max_sentences", "patience"):
        _at_least(f"eval.{key}", getattr(evaluation, key), 0)
    _at_least("eval.beam", evaluation.beam, 1)


class RuleBroken(QkvError):
    """A value of a config that breaks its rule; `key` ("section.key") names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _fail(key: str, value, rule: str):
    raise RuleBroken(key, f"{key} must be {rule}, not {value!r}")


def _at_least(key: str, value: int, least: int) -> None:
    if value < least:
        _fail(key, value, f"an integer of at least {least}")


def _seed(key: str, value: int) -> None:
    # What every generator it seeds takes (PyTorch's and NumPy's: a negative one was a traceback
    # after the data had been prepared)
    if not 0 <= value < 2**32:
        _fail(key, value, "an integer in [0, 2**32)")


def _probability(key: str, value: float) -> None:
    if not 0 <= value < 1:  # False for NaN too
        _fail(key, value, "a probability in [0, 1)")


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        _fail(key, value, f"one of {', '.join(map(repr, choices))}")
