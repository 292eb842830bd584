"""Checkpoints: atomic save, safe load (no code from the file is ever executed), and run directories.

A checkpoint is a dict saved with ``torch.save``::

    {"model": state_dict, "model_config": TransformerConfig.to_dict(), ...training state...}

A run directory (what ``qkv train --out RUN_DIR`` writes) holds ``config.toml``, ``tokenizer.model``,
``last.pt``, ``best.pt`` and ``checkpoint_<step>.pt`` files. Commands that take "a run directory or a
checkpoint" resolve a directory to its ``best.pt`` (else ``last.pt``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qkv.atomic import atomic_write, link_atomically
from qkv.errors import QkvError
from qkv.errors import warn as default_warn
from qkv.model import Transformer, TransformerConfig

BEST, LAST = "best.pt", "last.pt"
TOKENIZER = "tokenizer.model"


def save_checkpoint(path: str | Path, checkpoint: dict) -> None:
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; a missing, truncated or corrupt file is a
    QkvError naming it."""
    path = Path(path)
    if not path.is_file():
        raise QkvError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for damaged zip archives
        raise QkvError(_why_unreadable(path, error)) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise QkvError(f"{path}: not a qkv checkpoint (no 'model' entry)")
    return checkpoint


def _why_unreadable(path: Path, error: Exception) -> str:
    """One line for a file torch.load refused: PyTorch's own messages run to paragraphs (and its
    weights_only one suggests loading the file unsafely)."""
    if path.stat().st_size == 0:
        return f"{path}: not a readable checkpoint (an empty file)"
    text = str(error)
    if "Weights only load failed" in text:
        return (
            f"{path}: not a readable checkpoint (not one of qkv's: PyTorch cannot read it as "
            "tensors and plain data)"
        )
    first = (text.strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    return f"{path}: not a readable checkpoint (truncated or corrupt?): {first[:200]}"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best.pt (falling back to last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise QkvError(not_a_run(path))
    if not path.exists():
        raise QkvError(f"{path}: no such run directory or checkpoint")
    return path


def load_run_checkpoint(
    path: str | Path, map_location="cpu", warn: Callable[[str], None] | None = None
) -> tuple[dict, Path]:
    """The checkpoint of a run directory (its best.pt, else last.pt) or of a checkpoint file, and the
    file it came from. In a run directory a damaged checkpoint gives way to the newest readable one
    (last.pt, then checkpoint_<step>.pt newest first), with one warning (through `warn`, default
    `warnings.warn`) naming the damaged file."""
    path = Path(path)
    if not path.is_dir():
        checkpoint_path = resolve_checkpoint(path)
        return load_checkpoint(checkpoint_path, map_location), checkpoint_path
    candidates = [path / BEST, path / LAST, *reversed(step_checkpoints(path))]
    damaged = []
    for candidate in (c for c in candidates if c.is_file()):
        try:
            checkpoint = load_checkpoint(candidate, map_location)
        except QkvError as error:
            damaged.append(str(error))
            continue
        if damaged:
            message = f"{'; '.join(damaged)}; using {candidate.name}, the newest readable one"
            (warn or default_warn)(message)
        return checkpoint, candidate
    if damaged:
        raise QkvError(damaged[0])
    raise QkvError(not_a_run(path))


# What `qkv export` writes into its folder, by format (qkv.export): such a folder translates
# (`qkv translate`, `evaluate`), and the other commands need the run it came from.
EXPORT_FILES = {"model.bin": "a CTranslate2 export", "qkv_onnx.json": "an ONNX export"}


def not_a_run(path: Path) -> str:
    """Why the folder `path` is not a run directory (one line)."""
    for name, what in EXPORT_FILES.items():
        if (path / name).is_file():
            return (
                f"{path} is {what}, which qkv translate and evaluate read; this command needs the "
                "run it was exported from, or a checkpoint"
            )
    return f"{path}: run directory has neither {BEST} nor {LAST}"


def model_changes(checkpoint: dict, config: TransformerConfig) -> str:
    """How `config` differs from the checkpoint's model in what its weights are shaped by or mean
    ("d_model 64 -> 32, ..."; "" if in nothing): dropout may change, and the length of a table of
    sinusoids, which no checkpoint holds."""
    saved, now = checkpoint.get("model_config", {}), config.to_dict()
    unchanging = [key for key in now if key not in ("dropout", "attention_dropout")]
    if now.get("positional") != "learned":
        unchanging.remove("max_len")
    changed = [key for key in unchanging if key in saved and saved[key] != now[key]]
    return ", ".join(f"{key} {saved[key]!r} -> {now[key]!r}" for key in changed)


def model_from_checkpoint(checkpoint: dict, source: str | Path = "checkpoint") -> Transformer:
    if "model_config" not in checkpoint:
        raise QkvError(f"{source}: checkpoint has no 'model_config'")
    # The initial values are not drawn: the checkpoint's replace every parameter (the load is strict),
    # and drawing the small model's took ~60 ms of a cold `qkv translate` of ~1 s.
    with ParametersNotDrawn():
        model = Transformer(_config(checkpoint["model_config"], source))
    if not isinstance(checkpoint.get("model"), dict):
        raise QkvError(f"{source}: checkpoint has no weights ('model' is not a table of tensors)")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # keys missing, unexpected, or of other shapes
        problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        what = " ".join(problems[:MISFITS_SHOWN])
        if len(problems) > MISFITS_SHOWN:  # a model of another size: every weight misfits
            what += f" ... and {len(problems) - MISFITS_SHOWN} more"
        raise QkvError(f"{source}: its weights do not fit its model_config: {what}") from None
    return model.eval()


MISFITS_SHOWN = 3  # of a checkpoint's weights that do not fit its model_config, named in the error


def _config(values, source: str | Path) -> TransformerConfig:
    """The model's configuration as a checkpoint holds it, or a QkvError saying what is wrong."""
    if not isinstance(values, dict):
        raise QkvError(f"{source}: its model_config is not a table of settings")
    unknown = sorted(set(values) - {field.name for field in fields(TransformerConfig)})
    if unknown:
        raise QkvError(
            f"{source}: its model_config has settings this qkv does not know: "
            f"{', '.join(unknown)} (saved by a newer qkv? upgrade qkv)"
        )
    try:
        return TransformerConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise QkvError(f"{source}: its model_config is not a valid one: {error}") from None


class ParametersNotDrawn(TorchFunctionMode):
    """Within it, modules allocate their parameters but leave them as the allocator gives them: an
    initialisation (`torch.nn.init`, or a tensor's own `uniform_`, `normal_`, `zero_`, `fill_`) of an
    `nn.Parameter` does nothing. Anything else, buffers such as the sinusoids' table included, is
    computed as always. For a model whose every parameter is then loaded."""

    FILLS: ClassVar = {
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
        torch.Tensor.zero_,
        torch.Tensor.fill_,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        initialises = func in self.FILLS or (  # torch.nn.init's in-place functions, as normal_
            getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_")
        )
        if initialises and isinstance(target, nn.Parameter):
            return target
        return func(*args, **kwargs)


def load_model(
    path: str | Path, map_location="cpu", warn: Callable[[str], None] | None = None
) -> tuple[Transformer, Path]:
    """The model of a run directory or checkpoint file, in eval mode, and the checkpoint file it came
    from (its directory also holds the tokenizer). warn: as for `load_run_checkpoint`."""
    model, checkpoint_path, _ = load_trained_model(path, map_location, warn)
    return model, checkpoint_path


def load_trained_model(
    path: str | Path, map_location="cpu", warn: Callable[[str], None] | None = None
) -> tuple[Transformer, Path, dict]:
    """`load_model`, and what training recorded about the run (dataset, src_lang, tgt_lang)."""
    checkpoint, checkpoint_path = load_run_checkpoint(path, map_location=map_location, warn=warn)
    model = model_from_checkpoint(checkpoint, checkpoint_path)
    return model, checkpoint_path, checkpoint.get("meta") or {}


def model_checkpoint(model: Transformer, **extra) -> dict:
    """The smallest loadable checkpoint of a model (training adds its own state to this)."""
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), **extra}


# ---------------------------------------------------------------------------------------------------
# Averaging


def step_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run directory's checkpoint_<step>.pt files, oldest step first."""
    found = []
    for path in Path(run_dir).glob("checkpoint_*.pt"):
        step = path.stem.removeprefix("checkpoint_")
        if step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def last_step_checkpoints(run_dir: str | Path, n: int) -> list[Path]:
    """The `n` newest checkpoint_<step>.pt files of a run directory."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise QkvError(
            f"{run_dir}: is a checkpoint; --last N takes a run directory (or name the checkpoints "
            "to average, without --last)"
        )
    if not run_dir.is_dir():
        raise QkvError(f"{run_dir}: no such run directory")
    if n < 1:
        raise QkvError(f"--last must be at least 1, got {n}")
    paths = step_checkpoints(run_dir)
    if len(paths) < n:
        raise QkvError(
            f"{run_dir}: asked for the last {n} checkpoints but it has {len(paths)} "
            f"checkpoint_<step>.pt files (train.keep_last sets how many training keeps)"
        )
    return paths[-n:]


def average_checkpoints(paths: list[str | Path]) -> dict:
    """A checkpoint whose parameters are the mean of those of `paths` (the paper averaged the last 5
    or 20 checkpoints for its final models, section 6.1).

    All must share one model configuration. Sums are taken in float64 and cast back, so averaging
    copies of one checkpoint gives its weights exactly. Tied parameters (the output projection and
    the target embedding) stay one tensor. The result keeps the newest checkpoint's step and meta.
    """
    if not paths:
        raise QkvError("no checkpoints to average")
    checkpoints = [load_checkpoint(path) for path in paths]
    first, first_path = checkpoints[0], Path(paths[0])
    for path, checkpoint in zip(paths[1:], checkpoints[1:], strict=True):
        if checkpoint.get("model_config") != first.get("model_config"):
            raise QkvError(f"{path}: model configuration differs from {first_path}'s")
        if checkpoint["model"].keys() != first["model"].keys():
            raise QkvError(f"{path}: parameter names differ from {first_path}'s")
    averaged: dict[str, torch.Tensor] = {}
    by_storage: dict[int, torch.Tensor] = {}  # tied names share one storage: average it once
    for name, tensor in first["model"].items():
        storage = tensor.untyped_storage().data_ptr()
        if storage in by_storage and by_storage[storage].shape == tensor.shape:
            averaged[name] = by_storage[storage]
            continue
        values = [checkpoint["model"][name] for checkpoint in checkpoints]
        if not tensor.is_floating_point():
            averaged[name] = values[-1]
        else:
            total = torch.zeros(tensor.shape, dtype=torch.float64)
            for value in values:
                total += value.double()
            averaged[name] = (total / len(values)).to(tensor.dtype)
        by_storage[storage] = averaged[name]
    newest = checkpoints[-1]
    extra = {key: newest[key] for key in ("step", "meta") if key in newest}
    return {
        "model": averaged,
        "model_config": first["model_config"],
        **extra,
        "averaged_from": [str(path) for path in paths],
    }


def save_average(paths: list[str | Path], output: str | Path) -> Path | None:
    """Average `paths` into the checkpoint `output` (`average_checkpoints`), and copy the run's
    tokenizer.model beside it when none is there, so that `output` translates on its own. Returns
    the tokenizer copied, or None."""
    output = Path(output)
    tokenizer, target = Path(paths[-1]).parent / TOKENIZER, output.parent / TOKENIZER
    if target.exists() and tokenizer.is_file() and target.read_bytes() != tokenizer.read_bytes():
        # Averaged anyway, it said so and wrote a checkpoint that `qkv translate` then refused.
        raise QkvError(
            f"{target} is not {tokenizer.parent}'s tokenizer: the average would not translate "
            "with it; choose another -o folder"
        )
    save_checkpoint(output, average_checkpoints(paths))
    if target.exists() or not tokenizer.is_file():
        return None
    atomic_write(target, lambda file: file.write(tokenizer.read_bytes()))
    return tokenizer


def save_step_checkpoint(run_dir: Path, step: int, checkpoint: dict, keep_last: int) -> Path:
    """checkpoint_<step>.pt, and last.pt pointing at the same bytes; all but the `keep_last` newest
    step files removed (0 keeps them all)."""
    step_path = run_dir / f"checkpoint_{step}.pt"
    save_checkpoint(step_path, checkpoint)
    link_atomically(step_path, run_dir / LAST)
    for old in step_checkpoints(run_dir)[: -keep_last or None]:
        old.unlink(missing_ok=True)
    return step_path


def load_resumable_checkpoint(
    run_dir: Path, map_location, log: Callable[[str], None]
) -> tuple[dict, Path] | None:
    """The newest readable checkpoint of `run_dir` that holds the training state (last.pt, then
    checkpoint_<step>.pt newest first), and its path; a damaged one is skipped with a warning
    through `log`. None when there is none."""
    for path in [run_dir / LAST, *reversed(step_checkpoints(run_dir))]:
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint(path, map_location=map_location)
        except QkvError as error:
            log(f"warning: {error}; trying an older checkpoint")
            continue
        if "optimizer" in checkpoint:
            return checkpoint, path
    return None
