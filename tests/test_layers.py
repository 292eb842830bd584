"""qkv.layers: each piece of the stacks against the formula of its section of the paper."""

import math

import pytest
import torch
from torch import nn

from qkv.layers import (
    DecoderLayer,
    EncoderLayer,
    FeedForward,
    LearnedPositions,
    SinusoidalPositions,
    TokenEmbedding,
    sinusoidal_table,
)


def test_sinusoidal_table_is_the_formula_of_section_3_5():
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_positions_start_where_asked_and_refuse_to_run_past_max_len():
    for positions in (SinusoidalPositions(10, 8), LearnedPositions(10, 8)):
        assert torch.equal(positions(3, offset=2)[0], positions(5)[0, 2:])
        with pytest.raises(ValueError, match="longer than the model's max_len=10"):
            positions(4, offset=8)


def test_token_embeddings_are_scaled_by_sqrt_d_model():
    embedding = TokenEmbedding(20, 16, pad_id=0)
    ids = torch.tensor([[3, 5, 0]])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids] * 4.0)


def test_feed_forward_is_max_0_x_w1_b1_w2_b2():
    torch.manual_seed(0)
    ffn = FeedForward(8, 32).eval()
    x = torch.randn(2, 3, 8)
    w1, b1 = ffn.linear1.weight, ffn.linear1.bias
    w2, b2 = ffn.linear2.weight, ffn.linear2.bias
    expected = torch.clamp(x @ w1.T + b1, min=0) @ w2.T + b2
    torch.testing.assert_close(ffn(x), expected)


def copy_encoder_layer(ours: EncoderLayer, reference: nn.TransformerEncoderLayer) -> None:
    attention = reference.self_attn
    with torch.no_grad():
        for proj, weight, bias in zip(
            (ours.self_attn.q_proj, ours.self_attn.k_proj, ours.self_attn.v_proj),
            attention.in_proj_weight.chunk(3),
            attention.in_proj_bias.chunk(3),
            strict=True,
        ):
            proj.weight.copy_(weight)
            proj.bias.copy_(bias)
        ours.self_attn.out_proj.load_state_dict(attention.out_proj.state_dict())
        ours.feed_forward.linear1.load_state_dict(reference.linear1.state_dict())
        ours.feed_forward.linear2.load_state_dict(reference.linear2.state_dict())
        ours.norm1.load_state_dict(reference.norm1.state_dict())
        ours.norm2.load_state_dict(reference.norm2.state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
def test_an_encoder_layer_equals_torch_encoder_layer_post_or_pre_ln(norm_first):
    torch.manual_seed(1)
    reference = nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first
    ).eval()
    ours = EncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first).eval()
    copy_encoder_layer(ours, reference)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    out, _ = ours(x, mask[:, None, None, :])
    expected = reference(x, src_key_padding_mask=~mask)
    torch.testing.assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :3], expected[1, :3], rtol=1e-5, atol=1e-5)


def test_a_decoder_layer_sees_no_later_position_and_returns_both_weights():
    torch.manual_seed(2)
    layer = DecoderLayer(16, 4, 32, dropout=0.0).eval()
    y, memory = torch.randn(1, 6, 16), torch.randn(1, 4, 16)
    out, self_weights, cross_weights = layer(y, memory, None, need_weights=True)
    assert (self_weights[0].triu(diagonal=1) == 0).all()
    torch.testing.assert_close(cross_weights.sum(-1), torch.ones(1, 4, 6))
    changed = y.clone()
    changed[:, 4:] += 1.0  # later positions change: the earlier outputs must not
    torch.testing.assert_close(layer(changed, memory, None)[0][:, :4], out[:, :4])
