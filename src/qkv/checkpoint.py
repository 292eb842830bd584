"""Checkpoints: atomic save, safe load (no code from the file is ever executed), and run directories.

A checkpoint is a dict saved with ``torch.save``::

    {"model": state_dict, "model_config": TransformerConfig.to_dict(), ...training state...}

A run directory (what ``qkv train --out RUN_DIR`` writes) holds ``config.toml``, ``tokenizer.model``,
``last.pt``, ``best.pt`` and ``checkpoint_<step>.pt`` files. Commands that take "a run directory or a
checkpoint" resolve a directory to its ``best.pt`` (else ``last.pt``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qkv.atomic import atomic_write
from qkv.errors import QkvError
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
        raise QkvError(
            f"{path}: not a readable checkpoint (truncated or corrupt?): {error}"
        ) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise QkvError(f"{path}: not a qkv checkpoint (no 'model' entry)")
    return checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or a run directory's best.pt (falling back to last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise QkvError(f"{path}: run directory has neither {BEST} nor {LAST}")
    if not path.exists():
        raise QkvError(f"{path}: no such run directory or checkpoint")
    return path


def model_from_checkpoint(checkpoint: dict, source: str | Path = "checkpoint") -> Transformer:
    if "model_config" not in checkpoint:
        raise QkvError(f"{source}: checkpoint has no 'model_config'")
    model = Transformer(TransformerConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def load_model(path: str | Path, map_location="cpu") -> tuple[Transformer, Path]:
    """The model of a run directory or checkpoint file, in eval mode, and the checkpoint file it came
    from (its directory also holds the tokenizer)."""
    checkpoint_path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(checkpoint_path, map_location=map_location)
    return model_from_checkpoint(checkpoint, checkpoint_path), checkpoint_path


def model_checkpoint(model: Transformer, **extra) -> dict:
    """The smallest loadable checkpoint of a model (training adds its own state to this)."""
    return {"model": model.state_dict(), "model_config": model.config.to_dict(), **extra}
