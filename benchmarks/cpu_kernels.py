"""qkv's CPU kernels against the PyTorch functions they replace, side by side in one process.

linear: ``F.linear`` (MKL's sgemm for fp32) against ``qkv.kernels.linear`` (oneDNN), inference, fp32 and
bf16, at the shapes of decoding and of a training batch; and the decoding engine's
``qkv.inference.linear.PreparedLinear`` (oneDNN's packed weights), as in every step of a search; and
the FFN's first product with its ReLU, separate against fused (``PreparedLinear(..., relu=True)``).
topk: ``torch.topk`` against ``qkv.inference.topk.topk`` at the shape of a beam search's step (32
sentences x 5 beams x 8000 or 32000 words, k = 10), and with each beam's score added to its row on the
way (against adding it to every element first); argmax: ``Tensor.argmax`` against
``qkv.inference.topk.argmax`` (greedy search). dropout: ``F.dropout`` against ``qkv.kernels.dropout``,
forward and backward, in bf16 and fp32. Each figure is the median of --repeats timed calls after warm-up; the two sides alternate
call by call so that they share the machine's state.

(Not named kernels.py: transformers imports a module called `kernels` when it finds one, and the
script's folder is on the path when decode_speed.py runs.)

    python benchmarks/cpu_kernels.py                 # torch's default thread count
    python benchmarks/cpu_kernels.py --threads 1
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from timing import interleaved_median_seconds

from qkv import kernels
from qkv.hardware import describe_cpu
from qkv.inference import topk as topk_module
from qkv.inference.linear import PreparedLinear

# (rows, d_in, d_out): decoding the small model at batch 32, beam 5 (160 rows) and a training batch of
# about 4096 tokens; the last is the base model's FFN.
LINEAR_SHAPES = [
    (160, 256, 8000),
    (160, 256, 1024),
    (160, 1024, 256),
    (160, 256, 768),
    (5, 256, 8000),
    (4096, 256, 1024),
    (160, 512, 2048),
]
DROPOUT_SHAPE = (128, 32, 256)  # a batch of 4096 tokens of d_model 256
TOPK_SHAPES = [(32, 5 * 8000), (32, 5 * 32000)]  # beam 5 over vocabularies of 8000 and 32000


def bench_linear(repeats: int, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    if not kernels.onednn_linear_works(dtype):
        print(f"oneDNN has no {name} linear on this CPU: qkv.kernels.linear is F.linear here\n")
        return
    print(
        f"| linear, {name} inference | F.linear (ms) | qkv linear (ms) | qkv linear, packed (ms) |"
    )
    print("|---|---|---|---|")
    for rows, d_in, d_out in LINEAR_SHAPES:
        x, weight, bias = (
            torch.randn(*shape, dtype=dtype) for shape in [(rows, d_in), (d_out, d_in), (d_out,)]
        )
        with torch.inference_mode():
            prepared = PreparedLinear(weight, bias)
            median = interleaved_median_seconds(
                {
                    "torch": partial(F.linear, x, weight, bias),
                    "qkv": partial(kernels.linear, x, weight, bias),
                    "frozen": partial(prepared, x),
                },
                repeats,
            )
        torch_ms, qkv_ms, frozen_ms = (median[k] * 1e3 for k in ("torch", "qkv", "frozen"))
        print(
            f"| ({rows} x {d_in}) @ ({d_in} x {d_out}) | {torch_ms:.3f} | "
            f"{qkv_ms:.3f} ({torch_ms / qkv_ms:.2f}x) | {frozen_ms:.3f} ({torch_ms / frozen_ms:.2f}x) |"
        )
    print()


def relu_of(linear, x):
    return torch.relu(linear(x))


def bench_linear_relu(repeats: int) -> None:
    print("| ReLU(x W^T + b), fp32 inference, packed | linear, then relu (ms) | fused (ms) |")
    print("|---|---|---|")
    for rows, d_in, d_out in [(160, 256, 1024), (512, 256, 1024), (160, 512, 2048)]:
        x, weight, bias = (torch.randn(*shape) for shape in [(rows, d_in), (d_out, d_in), (d_out,)])
        with torch.inference_mode():
            linear, fused = PreparedLinear(weight, bias), PreparedLinear(weight, bias, relu=True)
            median = interleaved_median_seconds(
                {"separate": partial(relu_of, linear, x), "fused": partial(fused, x)},
                repeats,
            )
        separate_ms, fused_ms = median["separate"] * 1e3, median["fused"] * 1e3
        print(
            f"| ({rows} x {d_in}) @ ({d_in} x {d_out}) | {separate_ms:.3f} | "
            f"{fused_ms:.3f} ({separate_ms / fused_ms:.2f}x) |"
        )
    print()


def topk_of_sums(x, offsets, k, rows_per_group):
    return (x + offsets[:, None]).view(-1, rows_per_group * x.size(1)).topk(k, dim=1)


def forward_backward(dropout, x, grad) -> None:
    dropout(x, 0.3).backward(grad)


def bench_dropout(repeats: int) -> None:
    print("| dropout p=0.3, forward + backward | F.dropout (ms) | qkv dropout (ms) | speed-up |")
    print("|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(DROPOUT_SHAPE, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        median = interleaved_median_seconds(
            {
                "torch": partial(forward_backward, F.dropout, x, grad),
                "qkv": partial(forward_backward, kernels.dropout, x, grad),
            },
            repeats,
        )
        shape = " x ".join(map(str, DROPOUT_SHAPE))
        print(
            f"| ({shape}) {str(dtype).removeprefix('torch.')} | {median['torch'] * 1e3:.2f} | "
            f"{median['qkv'] * 1e3:.2f} | {median['torch'] / median['qkv']:.2f}x |"
        )


def bench_topk(repeats: int) -> None:
    print("| topk, k = 10 | torch.topk (ms) | qkv topk (ms) | speed-up |")
    print("|---|---|---|---|")
    for rows, length in TOPK_SHAPES:
        # Log-probabilities plus beam scores, as a search ranks them.
        x = torch.randn(rows, length).log_softmax(dim=1)
        median = interleaved_median_seconds(
            {"torch": partial(torch.topk, x, 10, 1), "qkv": partial(topk_module.topk, x, 10)},
            repeats,
        )
        print(
            f"| ({rows} x {length}) | {median['torch'] * 1e3:.3f} | {median['qkv'] * 1e3:.3f} | "
            f"{median['torch'] / median['qkv']:.2f}x |"
        )
    # A beam search step: 32 sentences x 5 beams, each beam's log-probabilities plus its score.
    x, offsets = torch.randn(160, 8000).log_softmax(dim=1), -10 * torch.rand(160)
    median = interleaved_median_seconds(
        {
            "torch": partial(topk_of_sums, x, offsets, 10, 5),
            "qkv": partial(topk_module.topk, x, 10, offsets, 5),
        },
        repeats,
    )
    print(
        f"| (160 x 8000) + beam scores, 32 groups of 5 rows | {median['torch'] * 1e3:.3f} | "
        f"{median['qkv'] * 1e3:.3f} | {median['torch'] / median['qkv']:.2f}x |"
    )
    print()
    print("| argmax | Tensor.argmax (ms) | qkv argmax (ms) | speed-up |")
    print("|---|---|---|---|")
    for rows in (1, 32):
        x = torch.randn(rows, 8000).log_softmax(dim=1)
        median = interleaved_median_seconds(
            {"torch": partial(torch.argmax, x, 1), "qkv": partial(topk_module.argmax, x)}, repeats
        )
        print(
            f"| ({rows} x 8000) | {median['torch'] * 1e3:.3f} | {median['qkv'] * 1e3:.3f} | "
            f"{median['torch'] / median['qkv']:.2f}x |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per figure (median)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_cpu() + "\n")
    bench_linear(args.repeats, torch.float32)
    bench_linear(args.repeats, torch.bfloat16)
    bench_linear_relu(args.repeats)
    bench_topk(args.repeats)
    bench_dropout(args.repeats)


if __name__ == "__main__":
    main()
