"""Training: the paper's recipe (section 5), exact resume after a crash, one CPU to many GPUs.

One plain loop. Each *update* consumes ``update_freq`` batches on every device; the loss of an update is
the label-smoothed cross-entropy summed over its target tokens on all devices, divided by their number,
so gradient accumulation and data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qkv.allocator import keep_large_blocks_on_the_heap
from qkv.atomic import atomic_write, remove_partial_writes
from qkv.checkpoint import (
    LAST,
    TOKENIZER,
    load_resumable_checkpoint,
    model_changes,
    model_checkpoint,
    save_checkpoint,
    save_step_checkpoint,
)
from qkv.config import Config, dump_toml, file_changes
from qkv.config_check import check_config
from qkv.data import EncodedSplit, TokenBatchSampler
from qkv.distributed import Distributed, restore_rng_states, rng_states, setup_distributed
from qkv.errors import QkvError
from qkv.hardware import precision_note, resolve_precision
from qkv.kernels import use_fast_kernels
from qkv.loss import label_smoothed_loss
from qkv.metrics import MetricsLog, RunningWindow, plot_curves, progress_bar, start_record
from qkv.model import Transformer
from qkv.outputs import made_folder
from qkv.run_folder import check_run_folder
from qkv.schedule import learning_rate
from qkv.training_data import check_lengths, load_training_data, resegmented, run_meta
from qkv.validation import validate

MAX_BAD_STEPS = 5  # consecutive non-finite losses before the run stops


# ---------------------------------------------------------------------------------------------------
# Training state, saved in every checkpoint


@dataclass
class Progress:
    step: int = 0  # updates done
    epoch: int = 0  # current epoch (0-based)
    batches_done: int = 0  # global batches of the current epoch already consumed
    best_bleu: float = -1.0
    evals_without_improvement: int = 0
    target_tokens: int = 0  # seen so far, all devices


# ---------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Owns one run: the model, the optimizer, the data order, the run directory and its files."""

    def __init__(self, config: Config, run_dir: Path, data, dist_info: Distributed, log=print):
        self.config = config
        self.run_dir = run_dir
        self.data = (
            data  # qkv.prepared.PreparedData: tokenizer, encoded splits, raw validation text
        )
        self.dist = dist_info
        self.log = log if dist_info.is_main else (lambda *a, **k: None)
        self.progress = Progress()
        train = config.train
        # 'fp32' or 'bf16': what train.precision ('auto' too) means on this device.
        self.precision = resolve_precision(
            train.precision, dist_info.device, warn=lambda message: self.log(f"warning: {message}")
        )
        tokenizer = data.tokenizer
        self.model_config = config.model_config(
            tokenizer.vocab_size,
            dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id),
        )
        torch.manual_seed(train.seed)
        random.seed(train.seed)
        # The reference model, its linear maps and dropout computed by qkv.kernels (same parameters).
        self.model = use_fast_kernels(Transformer(self.model_config).to(dist_info.device))
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=0.0,
            betas=tuple(train.adam_betas),
            eps=train.adam_eps,
            weight_decay=train.weight_decay,
            # One kernel per parameter instead of ~10 (a fifth of the optimizer's time on a CPU).
            fused=dist_info.device.type in ("cpu", "cuda"),
        )
        if config.data.subword_dropout and data.train.src_text is None:
            raise QkvError(
                f"data.subword_dropout needs the raw training text beside the ids, and {data.path} "
                "has none (prepared by an older qkv): prepare the data again"
            )
        self.sampler = self.make_sampler(data.train)
        self.epoch_data = (None, data.train, self.sampler)  # (epoch, split, sampler) in use
        self.train_model = self.model  # what the forward pass calls: maybe wrapped by DDP / compile
        self.bad_steps = 0
        self.last_saved_step = self.last_eval_step = -1  # steps whose checkpoint / validation exist
        self.started = time.time()
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if dist_info.is_main else None

    def make_sampler(self, split: EncodedSplit) -> TokenBatchSampler:
        train = self.config.train
        return TokenBatchSampler(
            split.lengths(),
            train.max_tokens,
            seed=train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pad_multiple=train.pad_multiple,
        )

    def epoch_split(self, epoch: int) -> tuple[EncodedSplit, TokenBatchSampler]:
        """The training pairs of `epoch` as ids, and their batches: the prepared ids every epoch, or
        with subword dropout the text segmented anew for the epoch (`resegmented`)."""
        cached_epoch, split, sampler = self.epoch_data
        if not self.config.data.subword_dropout or cached_epoch == epoch:
            return split, sampler
        split = resegmented(self.data, self.config, epoch)
        sampler = self.make_sampler(split)
        self.epoch_data = (epoch, split, sampler)
        return split, sampler

    def wrap_model(self) -> None:
        """DDP and torch.compile around the model, after any resumed weights are in place (DDP
        broadcasts rank 0's parameters when it wraps)."""
        if self.dist.world_size > 1:
            device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=device_ids
            )
        if self.config.train.compile:
            self.train_model = torch.compile(self.train_model)

    # -- one update -----------------------------------------------------------------------------

    def autocast(self):
        enabled = self.precision == "bf16"
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=enabled)

    def logits(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> tuple[Tensor, Tensor]:
        """The logits where the loss wants them, and the targets there. Eager, the model skips the
        padding (`Transformer.forward`'s only_at); compiled, it computes every position, so that
        the compiler sees no shape that depends on the data."""
        if self.config.train.compile:
            return self.train_model(src, tgt_in), tgt_out
        real = tgt_out != self.model_config.pad_id
        return self.train_model(src, tgt_in, only_at=real), tgt_out[real]

    def update(self, batches: list) -> dict | None:
        """Forward and backward over this device's batches of one update, then one optimizer step.

        Returns the update's statistics, or None when the loss was not finite and the step was skipped.
        """
        train = self.config.train
        pad_id = self.model_config.pad_id
        local_tokens = sum(batch.n_tgt_tokens for batch in batches)
        global_tokens = self.dist.all_sum(local_tokens)
        # DDP averages gradients over devices; scale so the result is the sum over all tokens / their count.
        scale = self.dist.world_size / global_tokens
        loss_sum = nll_sum = 0.0
        self.model.train()
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = contextlib.nullcontext()
            if isinstance(self.train_model, torch.nn.parallel.DistributedDataParallel) and not last:
                # All-reduce gradients once, on the last micro-batch.
                sync = self.train_model.no_sync()
            with sync:
                src = batch.src.to(self.dist.device, non_blocking=True)
                tgt_in = batch.tgt_in.to(self.dist.device, non_blocking=True)
                tgt_out = batch.tgt_out.to(self.dist.device, non_blocking=True)
                with self.autocast():
                    logits, tgt_out = self.logits(src, tgt_in, tgt_out)
                loss, nll = label_smoothed_loss(logits, tgt_out, train.label_smoothing, pad_id)
                (loss * scale).backward()
            loss_sum += loss.item()
            nll_sum += nll.item()

        loss_sum, nll_sum = self.dist.all_sum(loss_sum), self.dist.all_sum(nll_sum)
        if not math.isfinite(loss_sum):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        step = self.progress.step + 1
        lr = learning_rate(
            step,
            train.lr_schedule,
            train.lr,
            self.model_config.d_model,
            train.warmup_steps,
            train.max_steps,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = None
        if train.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss_sum / global_tokens,
            "nll": nll_sum / global_tokens,
            "lr": lr,
            "tokens": int(global_tokens),
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }

    # -- the loop -------------------------------------------------------------------------------

    def finished(self) -> bool:
        train, progress = self.config.train, self.progress
        if train.max_steps and progress.step >= train.max_steps:
            return True
        if train.max_epochs and progress.epoch >= train.max_epochs:
            return True
        if train.max_hours and time.time() - self.started > train.max_hours * 3600:
            return True
        patience = self.config.eval.patience
        return bool(patience) and progress.evals_without_improvement >= patience

    def epoch_updates(self):
        """This device's batches for each remaining update of the current epoch, and how many.

        The sampler gives device r every world_size-th batch of one seeded global order, so an update
        of ``update_freq`` batches on each of N devices covers exactly the batches that one device would
        take with N times the update_freq: the same gradient, summed in another order.
        """
        split, sampler = self.epoch_split(self.progress.epoch)
        order = sampler.batches(self.progress.epoch)
        per_update = self.config.train.update_freq
        while self.progress.batches_done < len(order):
            start = self.progress.batches_done
            mine = order[start : start + per_update]
            pad_multiple = self.config.train.pad_multiple
            batches = [split.collate(indices, pad_multiple=pad_multiple) for indices in mine]
            yield batches, len(mine)

    def run(self) -> dict:
        train = self.config.train
        if not train.max_steps and not train.max_epochs:
            raise QkvError(
                "set train.max_steps or train.max_epochs (both are 0: the run would never end)"
            )
        started = self.started = time.time()
        start_step, start_tokens = self.progress.step, self.progress.target_tokens
        bar = progress_bar(train.max_steps or None, self.progress.step, self.dist.is_main)
        window = RunningWindow()
        while not self.finished():
            for batches, consumed in self.epoch_updates():
                stats = self.update(batches)
                self.progress.batches_done += consumed
                if stats is None:
                    self.skip_bad_step()
                    continue
                self.bad_steps = 0
                self.progress.step += 1
                self.progress.target_tokens += stats["tokens"]
                window.add(stats)
                bar.update(1)
                bar.set_postfix_str(window.postfix(self.progress.epoch), refresh=False)
                self.after_update(window)
                if self.finished():
                    break
            else:
                self.progress.epoch += 1
                self.progress.batches_done = 0
        bar.close()
        elapsed = time.time() - started
        if self.last_eval_step != self.progress.step:  # always validate at the end
            self.evaluate()
            self.save()  # the saved progress must include this evaluation
        elif self.last_saved_step != self.progress.step:
            self.save()
        tokens = self.progress.target_tokens - start_tokens
        return {
            "steps": self.progress.step,
            "new_steps": self.progress.step - start_step,
            "epochs": self.progress.epoch,
            "seconds": elapsed,
            "target_tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            "best_bleu": self.progress.best_bleu,
            "run_dir": str(self.run_dir),
        }

    def record_start(self) -> None:
        """A line in metrics.jsonl for each start of the run (the first line of a new one)."""
        if self.metrics is not None:
            precision = (self.precision, self.config.train.precision)
            self.metrics.write(start_record(self.progress.step, *precision, self.dist.device))

    def after_update(self, window: RunningWindow) -> None:
        step = self.progress.step
        train, evaluation = self.config.train, self.config.eval
        if self.metrics is not None and (step % train.log_every == 0 or step == 1):
            self.metrics.write({"step": step, "epoch": self.progress.epoch, **window.averages()})
        if evaluation.every_steps and step % evaluation.every_steps == 0:
            self.evaluate()
        if train.save_every and step % train.save_every == 0:
            self.save()

    def skip_bad_step(self) -> None:
        self.bad_steps += 1
        self.log(
            f"warning: step {self.progress.step + 1}: loss is not finite; update skipped "
            f"({self.bad_steps} in a row)"
        )
        if self.bad_steps >= MAX_BAD_STEPS:
            raise QkvError(
                f"{MAX_BAD_STEPS} non-finite losses in a row at step {self.progress.step + 1}: "
                f"stopping. The last good checkpoint is {self.run_dir / LAST}; try a lower train.lr, "
                "more train.warmup_steps, or train.clip_norm"
            )

    # -- validation -----------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation loss, perplexity and greedy BLEU; keeps best.pt when BLEU improves."""
        self.last_eval_step = self.progress.step
        self.model.eval()
        with self.autocast():
            scores = validate(self.model, self.data, self.config, self.dist.device)
        result = {"step": self.progress.step, **scores}
        self.model.train()
        if not self.dist.is_main:
            return result
        improved = result["bleu"] > self.progress.best_bleu
        if improved:
            self.progress.best_bleu = result["bleu"]
            self.progress.evals_without_improvement = 0
            save_checkpoint(self.run_dir / "best.pt", self.checkpoint(with_training_state=False))
        else:
            self.progress.evals_without_improvement += 1
        self.metrics.write({"split": "valid", **result})
        self.log(
            f"step {result['step']}: valid loss {result['loss']:.3f}, ppl {result['ppl']:.2f}, "
            f"BLEU {result['bleu']:.2f}" + (" (best so far)" if improved else "")
        )
        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return result

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint(self, with_training_state: bool = True) -> dict:
        extra = {
            "step": self.progress.step,
            "meta": run_meta(self.data),
            "config": self.config.to_dict(),
            "precision": self.precision,
        }
        if with_training_state:
            extra.update(
                optimizer=self.optimizer.state_dict(),
                progress=vars(self.progress).copy(),
                rng=rng_states(),
            )
        return model_checkpoint(self.model, **extra)

    def save(self) -> None:
        """checkpoint_<step>.pt, and last.pt pointing at the same bytes; older step files pruned."""
        self.last_saved_step = self.progress.step
        if not self.dist.is_main:
            return
        save_step_checkpoint(
            self.run_dir, self.progress.step, self.checkpoint(), self.config.train.keep_last
        )

    def resume(self) -> bool:
        """Continue from the newest readable checkpoint of the run directory; False if there is none."""
        found = load_resumable_checkpoint(self.run_dir, self.dist.device, self.log)
        if found is None:
            return False
        checkpoint, path = found
        if differences := model_changes(checkpoint, self.model.config):
            raise QkvError(
                f"{path}: the run's model is not this config's ({differences}): --resume goes on "
                "with the run's model; train a new one into another --out"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.progress = Progress(**checkpoint["progress"])
        restore_rng_states(checkpoint["rng"])
        self.last_saved_step = self.progress.step
        if self.metrics is not None:
            self.metrics.truncate_after(self.progress.step)
        self.log(f"resumed from {path} at step {self.progress.step}")
        return True


def train(config: Config, run_dir: str | Path, resume: bool = False, log=print) -> dict:
    """Train a model as `config` says, writing everything to `run_dir`; returns the run's summary."""
    check_config(config)  # a Config built in Python has not been checked yet
    run_dir = Path(run_dir)
    check_run_folder(run_dir, resume)
    dist_info = setup_distributed(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if dist_info.device.type == "cpu":
        keep_large_blocks_on_the_heap()  # the logits and their gradient, reused at every step
    with made_folder(run_dir):  # a config that names no data, or data not there: no empty run
        if dist_info.is_main:
            for folder in (run_dir, run_dir / "data"):
                for path in remove_partial_writes(folder):
                    log(f"removed {path}, left by a write that was cut short")
        data = load_training_data(config, run_dir, dist_info, log)
    trainer = Trainer(config, run_dir, data, dist_info, log)
    max_len, filters = trainer.model.config.max_len, not config.data.prepared
    check_lengths(data, max_len, config.train.pad_multiple, filters)
    resumed = resume and trainer.resume()  # first: a run it refuses keeps its config.toml
    if dist_info.is_main:
        text = dump_toml(config)
        if resumed and (changed := file_changes(run_dir / "config.toml", text)):
            log(f"resuming with another config than the run's ({', '.join(changed)}): "
                "config.toml now says so")  # fmt: skip
        atomic_write(run_dir / "config.toml", lambda file: file.write(text.encode()))
        tokenizer_bytes = (Path(data.path) / TOKENIZER).read_bytes()
        atomic_write(run_dir / TOKENIZER, lambda file: file.write(tokenizer_bytes))
    if resume and not resumed:
        log(f"no checkpoint to resume in {run_dir}: starting from scratch")
    if not resumed and trainer.metrics is not None:
        kept = trainer.metrics.start_anew()
        if kept is not None:
            log(f"kept the metrics of a run that saved no checkpoint as {kept}")
    trainer.wrap_model()
    trainer.record_start()
    log(
        f"training {trainer.model.num_parameters():,} parameters on {dist_info.device}"
        + (f" x {dist_info.world_size} processes" if dist_info.world_size > 1 else "")
        + f", {precision_note(config.train.precision, trainer.precision, dist_info.device)}"
        + f"; {len(data.train):,} training pairs, {len(data.val):,} validation pairs"
    )
    return trainer.run()
