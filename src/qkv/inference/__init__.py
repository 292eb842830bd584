"""The decoding engine: what makes translation fast, kept apart from the reference model.

    engine = prepare_for_decoding(model)         # the weights prepared once (qkv.inference.linear)
    memory, src_mask = engine.encode(src_ids)
    cache = engine.new_cache(max_beams=5)        # qkv.inference.beam_cache
    logits = engine.step(last_tokens, memory, src_mask, cache)   # one position, every row
    # or what the searches call, made from `step` (`NextToken`): log-probabilities with some ids
    # banned, or the most likely next token and its log-probability
    log_probs = engine.next_log_probs(last_tokens, memory, src_mask, cache, banned=(pad_id,))
    best, best_log_probs = engine.next_best(last_tokens, memory, src_mask, cache)

`qkv.search` runs its searches on an engine (given a model, it prepares one for the call); `qkv.model`
knows nothing of it.
"""

from qkv.inference.beam_cache import BeamCache
from qkv.inference.engine import DecodingEngine, log_softmax, prepare_for_decoding

__all__ = ["BeamCache", "DecodingEngine", "log_softmax", "prepare_for_decoding"]
