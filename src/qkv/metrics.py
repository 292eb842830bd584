"""Watching a run: running averages for the progress bar, metrics.jsonl (appended a line at a time,
so a crash loses at most one), and the curves drawn from it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

from qkv.atomic import atomic_write


class RunningWindow:
    """Averages of the updates since the last log line, for the progress bar and metrics.jsonl."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = 0.0
        self.tokens = 0
        self.lr = 0.0
        self.started = time.time()

    def add(self, stats: dict) -> None:
        self.loss += stats["loss"] * stats["tokens"]
        self.nll += stats["nll"] * stats["tokens"]
        self.tokens += stats["tokens"]
        self.lr = stats["lr"]

    def averages(self) -> dict:
        seconds = max(time.time() - self.started, 1e-9)
        tokens = max(self.tokens, 1)
        values = {
            "loss": self.loss / tokens,
            "nll": self.nll / tokens,
            "ppl": math.exp(min(self.nll / tokens, 50)),
            "lr": self.lr,
            "tokens_per_second": self.tokens / seconds,
        }
        self.reset()
        return values

    def postfix(self, epoch: int) -> str:
        tokens = max(self.tokens, 1)
        seconds = max(time.time() - self.started, 1e-9)
        return (
            f"epoch {epoch + 1} loss {self.loss / tokens:.3f} lr {self.lr:.2e} "
            f"{self.tokens / seconds:,.0f} tok/s"
        )


def progress_bar(total: int | None, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        disable=not enabled,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def start_record(step: int, precision: str, precision_asked: str, device) -> dict:
    """The line metrics.jsonl gets at each start of a run: from which step, in which precision (and
    what the config asked for), on what device and CPU or GPU."""
    import torch

    from qkv.hardware import describe_cpu

    hardware = describe_cpu() if device.type == "cpu" else torch.cuda.get_device_name(device)
    return {
        "event": "start",
        "step": step,
        "precision": precision,
        "precision_asked": precision_asked,
        "device": str(device),
        "hardware": hardware,
    }


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended and flushed, so a crash loses at most one line."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def start_anew(self) -> Path | None:
        """For a run that starts from step 0: move an earlier start's lines (a run killed before its
        first checkpoint) to metrics.jsonl.N, the first free N, so the curves show one run. Returns
        where they went, or None if there were none."""
        if not self.path.is_file():
            return None
        number = 1
        while (kept := self.path.with_name(f"{self.path.name}.{number}")).exists():
            number += 1
        os.replace(self.path, kept)
        return kept

    def truncate_after(self, step: int) -> None:
        """On resume, drop what the crashed run logged after its last checkpoint."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda file: file.write(text.encode()))


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
            records.append(json.loads(line))
    return records


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss and validation loss/BLEU against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "split" not in r and "loss" in r]
    valid = [r for r in records if r.get("split") == "valid"]
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    # NLL on both sides: the training loss proper adds label smoothing, which validation does not.
    ax_loss.plot([r["step"] for r in train], [r["nll"] for r in train], label="train")
    ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid")
    ax_loss.set(xlabel="step", ylabel="NLL per target token", title="Loss (no label smoothing)")
    ax_loss.legend()
    ax_bleu.plot([r["step"] for r in valid], [r["bleu"] for r in valid], "o-", color="tab:green")
    ax_bleu.set(xlabel="step", ylabel="BLEU", title="Validation BLEU (greedy)")
    for ax in (ax_loss, ax_bleu):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda file: fig.savefig(file, format="png", dpi=100))
    plt.close(fig)
