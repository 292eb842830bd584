"""Validation during training: loss and perplexity by teacher forcing, BLEU of the model's own
translations (`qkv.evaluate`, as `qkv evaluate` scores a test set)."""

from __future__ import annotations

import math

import torch

from qkv.config import Config
from qkv.data import EncodedSplit, TokenBatchSampler
from qkv.loss import label_smoothed_loss
from qkv.model import Transformer
from qkv.translate import Translator


@torch.no_grad()
def validate(model: Transformer, data, config: Config, device: torch.device) -> dict:
    """Loss and perplexity on the validation split (teacher forcing), and BLEU of greedy (or beam)
    translations of its sources against the raw reference text."""
    from qkv.evaluate import score

    valid: EncodedSplit = data.val
    pad_id = model.config.pad_id
    sampler = TokenBatchSampler(valid.lengths(), config.train.max_tokens, shuffle=False)
    nll_sum = tokens = 0.0
    for indices in sampler.batches(0):
        batch = valid.collate(indices).to(device)
        real = batch.tgt_out != pad_id
        logits = model(batch.src, batch.tgt_in, only_at=real)
        nll_sum += label_smoothed_loss(logits, batch.tgt_out[real], 0.0, pad_id)[1].item()
        tokens += batch.n_tgt_tokens
    limit = config.eval.max_sentences or len(valid)
    translator = Translator(model, data.tokenizer, device)
    hypotheses = translator.translate(
        valid.src_text[:limit], beam=config.eval.beam, max_tokens=config.train.max_tokens
    )
    bleu = score(hypotheses, valid.tgt_text[:limit], metrics=["bleu"])["bleu"]
    loss = nll_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bleu": bleu}
