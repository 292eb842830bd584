"""Run configuration: plain dataclasses, loaded from TOML, overridden with ``--set section.key=value``.

An unknown section or key, a value of the wrong type, or one that breaks its rule
(`qkv.config_check`) is an error that names it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from qkv.errors import QkvError
from qkv.model import PRESETS, TransformerConfig


@dataclass
class ModelSection:
    """The model: a preset ('tiny', 'small', 'base', 'big') and any field of `qkv.model.TransformerConfig`
    overridden. None means the preset's value, else TransformerConfig's default: one set of defaults.

    Vocabulary sizes and special ids are not set here: they come from the tokenizer."""

    preset: str = "small"
    d_model: int | None = None
    n_heads: int | None = None
    d_ff: int | None = None
    n_encoder_layers: int | None = None
    n_decoder_layers: int | None = None
    dropout: float | None = None
    attention_dropout: float | None = None
    max_len: int | None = None
    norm_first: bool | None = None
    positional: str | None = None
    activation: str | None = None
    share_embeddings: bool | None = None
    tie_output: bool | None = None


@dataclass
class DataSection:
    """Where the parallel text comes from: a named dataset ('multi30k', 'synthetic') prepared on the fly,
    a directory written by ``qkv prepare``, or file prefixes of the user's own corpus."""

    dataset: str | None = None
    src_lang: str | None = None
    tgt_lang: str | None = None
    prepared: str | None = None  # a `qkv prepare --out` directory; used as is when given
    data_dir: str | None = (
        None  # where named datasets live (default: $QKV_DATA_DIR or the user cache)
    )
    trainpref: str | None = None
    validpref: str | None = None
    testpref: str | None = None
    vocab_size: int | None = None  # subwords of the joint tokenizer; None = the dataset's default
    tokenizer_type: str = "bpe"  # 'bpe' | 'unigram'
    max_len: int = 256  # longer pairs (in subwords) are dropped when preparing
    seed: int = 1
    # BPE-dropout (Provilkov et al., 2020): each epoch the training text is segmented anew, every merge
    # skipped with this probability, so the model sees many segmentations of a word. 0 = off; 0.1 is
    # the paper's value. Validation, test and translation always use the one deterministic segmentation.
    subword_dropout: float = 0.0
    subword_dropout_side: str = "both"  # 'both' | 'source' (the target keeps its one segmentation)


@dataclass
class TrainSection:
    """The optimisation recipe (paper section 5.3-5.4) and the run's bookkeeping."""

    max_steps: int = 0  # updates; 0 = no limit (then max_epochs decides)
    max_epochs: int = 0  # 0 = no limit
    seed: int = 1
    max_tokens: int = 4096  # per batch on each device, padding included
    # Lengths are padded up to a multiple of this: 8 keeps shapes few (torch.compile, tensor cores), at
    # the cost of padding (Multi30k: 80% real tokens with 8, 96% with 1). On a CPU without compile, 1.
    pad_multiple: int = 8
    max_hours: float = (
        0.0  # stop cleanly (evaluate, save) after this much wall-clock time; 0 = no limit
    )
    update_freq: int = 1  # batches accumulated into one update
    lr_schedule: str = "noam"  # 'noam' (the paper) | 'inverse_sqrt' (fairseq)
    # noam: lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), so lr is the paper's factor (1.0);
    # inverse_sqrt: lr * min(step / warmup, sqrt(warmup / step)), so lr is the peak learning rate.
    lr: float = 1.0
    warmup_steps: int = 4000
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 0.0  # 0 = no clipping
    # 'auto' | 'fp32' | 'bf16' (autocast). auto: bf16 where the device computes it natively, else
    # fp32 (qkv.hardware); bf16 on a CPU without bf16 instructions trains ~20x slower than fp32.
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    save_every: int = 1000  # steps between step checkpoints (last.pt is refreshed at the same time)
    keep_last: int = 5  # step checkpoints kept
    log_every: int = 50  # steps between lines in metrics.jsonl


@dataclass
class EvalSection:
    """Validation during training: loss, perplexity and BLEU by greedy decoding."""

    every_steps: int = 1000  # 0 = only at the end
    max_sentences: int = 0  # validation sentences decoded for BLEU; 0 = all
    beam: int = 1  # 1 = greedy
    patience: int = 0  # stop after this many evaluations without a better BLEU; 0 = never


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def model_config(self, vocab_size: int, special_ids: dict[str, int]) -> TransformerConfig:
        """The TransformerConfig for a tokenizer of `vocab_size` with these pad/bos/eos ids."""
        overrides = {
            f.name: getattr(self.model, f.name)
            for f in dataclasses.fields(self.model)
            if f.name != "preset" and getattr(self.model, f.name) is not None
        }
        if self.model.preset not in PRESETS:
            raise QkvError(
                f"model.preset: unknown preset {self.model.preset!r}; "
                f"choose one of {', '.join(PRESETS)}"
            )
        try:
            return TransformerConfig.preset(
                self.model.preset,
                src_vocab_size=vocab_size,
                tgt_vocab_size=vocab_size,
                **special_ids,
                **overrides,
            )
        except ValueError as error:
            raise QkvError(f"[model]: {error}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """A Config from a TOML file (or the defaults), then each ``section.key=value`` override applied."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            inside = (
                f" (the run's config is {path / 'config.toml'})"
                if (path / "config.toml").is_file()
                else ""
            )
            raise QkvError(f"{path} is a folder, not a config file{inside}")
        if not path.is_file():
            raise QkvError(f"{path}: no such config file")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise QkvError(f"{path}: not valid TOML: {error}") from None
    source = str(path) if path else "config"
    config_from_dict(values, source)  # the file's own keys and types, named by the file
    set_by: dict[str, str] = {}  # "section.key" -> the last --set that gave it
    for override in overrides:
        section, key, value = parse_override(override)
        # Named by itself; quoted where it holds a newline or another unprintable character, so
        # that the error stays one line.
        shown = override if override.isprintable() else repr(override)
        set_by[f"{section}.{key}"] = f"--set {shown}"
        config_from_dict({section: {key: value}}, source=set_by[f"{section}.{key}"])
        values.setdefault(section, {})[key] = value
    config = config_from_dict(values, source)
    from qkv.config_check import RuleBroken, check_config  # it reads choices from other modules

    try:
        check_config(config)
    except RuleBroken as error:  # named by where the value came from: the last --set, or the file
        where = set_by.get(error.key, path)
        raise QkvError(f"{where}: {error}" if where else str(error)) from None
    return config


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.lr=2.0' -> ('train', 'lr', 2.0). The value is read as TOML, else taken as a string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise QkvError(f"--set {text!r}: expected section.key=value, e.g. train.max_steps=1000")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key, value


def config_from_dict(values: dict, source: str = "config") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    built = {}
    for section_name, section_values in values.items():
        if section_name not in sections:
            raise QkvError(
                f"{source}: unknown section [{section_name}]; "
                f"expected one of {', '.join(f'[{s}]' for s in sections)}"
            )
        if not isinstance(section_values, dict):
            raise QkvError(f"{source}: {section_name} must be a table, like [{section_name}]")
        section_class = typing.get_type_hints(Config)[section_name]
        built[section_name] = section_from_dict(section_class, section_name, section_values, source)
    return Config(**built)


def section_from_dict(section_class, section_name: str, values: dict, source: str):
    hints = typing.get_type_hints(section_class)
    for key, value in values.items():
        if key not in hints:
            raise QkvError(
                f"{source}: unknown key {section_name}.{key}; "
                f"[{section_name}] has {', '.join(hints)}"
            )
        if not matches_type(value, hints[key]):
            raise QkvError(
                f"{source}: {section_name}.{key} must be {type_name(hints[key])}, "
                f"not {type(value).__name__} {value!r}"
            )
    return section_class(**{k: float(v) if hints[k] is float else v for k, v in values.items()})


def matches_type(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item_type,) = typing.get_args(expected)
        return isinstance(value, list) and all(matches_type(v, item_type) for v in value)
    if expected is float:  # TOML writes 1 for 1.0; accept it, but never a bool
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def type_name(expected) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(type_name(t) for t in typing.get_args(expected) if t is not type(None))
    if typing.get_origin(expected) is list:
        return f"a list of {type_name(typing.get_args(expected)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        expected, str(expected)
    )


def dump_toml(config: Config) -> str:
    """The config as TOML (None values left out, since TOML has no null)."""
    lines = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def toml_changes(before: str, after: str) -> list[str]:
    """What `after` (TOML, as `dump_toml` writes a config) sets otherwise than `before`, each as
    "section.key old -> new" ("unset" for a key one of them leaves out)."""
    old, new = tomllib.loads(before), tomllib.loads(after)
    changes = []
    for section in sorted(set(old) | set(new)):
        was, now = old.get(section, {}), new.get(section, {})
        for key in sorted(set(was) | set(now)):
            if was.get(key) != now.get(key):
                first, then = (repr(d[key]) if key in d else "unset" for d in (was, now))
                changes.append(f"{section}.{key} {first} -> {then}")
    return changes


def file_changes(path: Path, text: str) -> list[str]:
    """What the config `text` changes of the config file at `path` (`toml_changes`); none where the
    file is gone, or damaged."""
    try:
        return toml_changes(path.read_text(encoding="utf-8"), text)
    except (OSError, ValueError):  # tomllib's TOMLDecodeError is a ValueError
        return []
