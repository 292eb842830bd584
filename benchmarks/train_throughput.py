"""Training throughput: qkv against torch.nn.Transformer, one full training step each, side by side.

A step is forward, label-smoothed cross-entropy, backward and Adam, on the same batch (--sentences of
19-32 tokens: 128 by default, about 3,300 target tokens), vocabulary, dimensions and loss. The two
systems alternate in one process so they share the machine's state; each figure is the median of
--repeats timed steps after warm-up. qkv runs as `qkv train` runs it: eager, its model skips the
padding of the batch (`Transformer.forward`'s only_at: ~22% of the positions here); compiled, it
computes every position. `--every-position` and `--full-length` show the step without that.

    python benchmarks/train_throughput.py                 # small and base, fp32 and bf16
    python benchmarks/train_throughput.py --configs small --repeats 5
    python benchmarks/train_throughput.py --as-avx2 --precisions fp32   # as on an AVX2 CPU
    python benchmarks/train_throughput.py --device cuda --sentences 768 --compile   # on a GPU
    python benchmarks/train_throughput.py --heap-allocator    # glibc set as `qkv train` sets it
    python benchmarks/train_throughput.py --full-length       # no padding in the batch
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from timing import AS_AVX2, AS_AVX2_HELP, run_as_avx2_if_asked
from torch import nn

from qkv.allocator import keep_large_blocks_on_the_heap
from qkv.hardware import describe_cpu
from qkv.kernels import use_fast_kernels
from qkv.layers import sinusoidal_table
from qkv.loss import label_smoothed_loss
from qkv.model import Transformer, TransformerConfig

CONFIGS = {
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6),
}
VOCAB, PAD = 8000, 0
OWN_LOSS = "qkv+qkv.loss"


class TorchReference(nn.Module):
    """nn.Transformer with the same embeddings (shared, scaled), sinusoidal positions and tied output."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.embed = nn.Embedding(config.src_vocab_size, config.d_model, padding_idx=PAD)
        self.register_buffer("positions", sinusoidal_table(config.max_len, config.d_model))
        self.transformer = nn.Transformer(
            d_model=config.d_model,
            nhead=config.n_heads,
            num_encoder_layers=config.n_encoder_layers,
            num_decoder_layers=config.n_decoder_layers,
            dim_feedforward=config.d_ff,
            dropout=config.dropout,
            batch_first=True,
        )
        self.scale = math.sqrt(config.d_model)

    def forward(self, src, tgt):
        embed = lambda ids: self.embed(ids) * self.scale + self.positions[: ids.size(1)]  # noqa: E731
        causal = nn.Transformer.generate_square_subsequent_mask(
            tgt.size(1), device=tgt.device, dtype=torch.bool
        )
        hidden = self.transformer(
            embed(src),
            embed(tgt),
            tgt_mask=causal,
            src_key_padding_mask=src == PAD,
            memory_key_padding_mask=src == PAD,
            tgt_is_causal=True,
        )
        return hidden @ self.embed.weight.T


def make_batch(n_sentences: int, length: int, seed: int = 0, full_length: bool = False):
    """A padded batch with realistic ragged lengths (60-100% of `length`), or all of `length`."""
    generator = torch.Generator().manual_seed(seed)
    shortest = length if full_length else int(0.6 * length)
    lengths = torch.randint(shortest, length + 1, (n_sentences,), generator=generator)
    src = torch.randint(4, VOCAB, (n_sentences, length), generator=generator)
    tgt = torch.randint(4, VOCAB, (n_sentences, length + 1), generator=generator)
    positions = torch.arange(length)
    src[positions[None, :] >= lengths[:, None]] = PAD
    tgt[torch.arange(length + 1)[None, :] > lengths[:, None]] = PAD
    return src, tgt[:, :-1], tgt[:, 1:]


def training_step(
    model, optimizer, batch, precision: str, own_loss: bool = False, skip_padding: bool = False
) -> None:
    src, tgt_in, tgt_out = batch
    with torch.autocast(src.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        if skip_padding:  # qkv's logits at the real target positions only, as `qkv train` asks
            real = tgt_out != PAD
            logits, tgt_out = model(src, tgt_in, only_at=real), tgt_out[real]
        else:
            logits = model(src, tgt_in)
    if own_loss:  # qkv.loss, as `qkv train` computes it: the same loss, the same gradient
        loss = label_smoothed_loss(logits, tgt_out, 0.1, PAD)[0] / (tgt_out != PAD).sum()
    else:
        loss = (
            F.cross_entropy(
                logits.flatten(0, -2).float(),
                tgt_out.flatten(),
                ignore_index=PAD,
                label_smoothing=0.1,
                reduction="sum",
            )
            / (tgt_out != PAD).sum()
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(config_name: str, precisions: list[str], args) -> list[dict]:
    device = torch.device(args.device)
    config = TransformerConfig(
        src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, share_embeddings=True, dropout=0.1,
        **CONFIGS[config_name],
    )  # fmt: skip
    torch.manual_seed(0)
    # As `qkv train` builds its model: the reference model with qkv.kernels' linear maps and dropout.
    models = {
        "qkv": use_fast_kernels(Transformer(config)),
        "nn.Transformer": TorchReference(config),
    }
    if args.own_loss:
        models[OWN_LOSS] = use_fast_kernels(Transformer(config))
    models = {name: model.to(device) for name, model in models.items()}
    optimizers = {
        name: torch.optim.Adam(
            model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=device.type == "cuda"
        )
        for name, model in models.items()
    }
    # torch.compile wraps the forward pass only: the loss and the optimizer stay as they are.
    systems = {n: torch.compile(m) if args.compile else m for n, m in models.items()}
    batch = make_batch(args.sentences, length=32, full_length=args.full_length)
    batch = tuple(t.to(device) for t in batch)
    # As `qkv train`: eager, qkv's model skips the padding; compiled, it computes every position.
    skip_padding = not (args.compile or args.every_position)
    target_tokens = int((batch[2] != PAD).sum())
    repeats, warmup = args.repeats, args.warmup
    runs = [(name, precision) for precision in precisions for name in systems]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    for round_ in range(warmup + repeats):
        for name, precision in runs:  # alternate, so both see the same machine state
            model = systems[name].train()
            started = time.perf_counter()
            qkv = name != "nn.Transformer"
            training_step(
                model,
                optimizers[name],
                batch,
                precision,
                own_loss=name == OWN_LOSS,
                skip_padding=qkv and skip_padding,
            )
            synchronize(device)
            if round_ >= warmup:
                times[(name, precision)].append(time.perf_counter() - started)
    reference = statistics.median(times[("nn.Transformer", precisions[0])])
    rows = []
    for name, precision in runs:
        median = statistics.median(times[(name, precision)])
        rows.append(
            dict(
                config=config_name,
                system=name,
                precision=precision,
                tokens_per_second=target_tokens / median,
                ratio=reference / median,
            )
        )
    return rows


def main() -> None:
    run_as_avx2_if_asked()  # before torch computes anything
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--sentences", type=int, default=128, help="sentences per batch, up to 32 tokens each"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--own-loss",
        action="store_true",
        help=f"also time '{OWN_LOSS}': qkv with its own label-smoothed loss (qkv.loss, as `qkv "
        "train` runs it) instead of F.cross_entropy; the other rows keep F.cross_entropy",
    )
    parser.add_argument(
        "--heap-allocator",
        action="store_true",
        help="every system with glibc's large blocks served from its heap and kept there, as `qkv "
        "train` sets it on the CPU (qkv.allocator); by default glibc as a plain PyTorch script has "
        "it, which maps each block over 32 MB afresh",
    )
    parser.add_argument(
        "--every-position",
        action="store_true",
        help="qkv computes every position of the batch, padding included, as nn.Transformer does "
        "(by default, eager, it skips the padding, as `qkv train` does)",
    )
    parser.add_argument(
        "--full-length",
        action="store_true",
        help="every sentence of the batch 32 tokens long: no padding, so nothing for qkv to skip",
    )
    parser.add_argument(AS_AVX2, action="store_true", help=AS_AVX2_HELP)
    args = parser.parse_args()
    heap = args.heap_allocator and keep_large_blocks_on_the_heap()  # before torch allocates
    print(describe_cpu())
    where = f"{torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name(args.device)
    _, _, tgt_out = make_batch(args.sentences, length=32, full_length=args.full_length)
    target_tokens = int((tgt_out != PAD).sum())
    skipped = "every position" if args.compile or args.every_position else "the padding skipped"
    print(
        f"torch {torch.__version__}, {where}, {args.sentences} sentences per batch "
        f"({target_tokens:,} target tokens, {1 - target_tokens / tgt_out.numel():.0%} of the "
        f"positions padding; qkv: {skipped}){', compiled' if args.compile else ''}; glibc's "
        + ("large blocks on its heap" if heap else "allocator as it starts")
    )
    print(
        f"{'config':7} {'system':15} {'precision':9} {'tgt tok/s':>10} "
        f"{'vs nn.Transformer ' + args.precisions[0]:>23}"
    )
    for config_name in args.configs:
        for row in benchmark(config_name, args.precisions, args):
            print(
                f"{row['config']:7} {row['system']:15} {row['precision']:9} "
                f"{row['tokens_per_second']:10,.0f} {row['ratio']:22.2f}x"
            )


if __name__ == "__main__":
    main()
