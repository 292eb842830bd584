"""qkv.loss: the label-smoothed cross-entropy of section 5.4 and its written-out gradient."""

import torch
import torch.nn.functional as F

from qkv.loss import label_smoothed_loss


def test_label_smoothed_loss_ignores_padding_and_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[1, 2, 0], [4, 0, 0]])  # 0 is padding
    loss, nll = label_smoothed_loss(logits, target, epsilon=0.1, pad_id=0)
    log_probs = logits.log_softmax(-1)
    expected_loss = expected_nll = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        true_nll = -log_probs[b, t, target[b, t]]
        expected_nll += true_nll
        expected_loss += 0.9 * true_nll + 0.1 * -log_probs[b, t].mean()
    torch.testing.assert_close(nll, expected_nll)
    torch.testing.assert_close(loss, expected_loss)


def test_label_smoothed_loss_and_its_gradient_equal_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 7, requires_grad=True)
    target = torch.tensor([[1, 2, 0, 0], [4, 5, 6, 0], [3, 3, 3, 3]])
    loss, nll = label_smoothed_loss(logits, target, epsilon=0.1, pad_id=0)
    (gradient,) = torch.autograd.grad(loss, logits)
    flat_logits, flat_target = logits.flatten(0, 1), target.flatten()
    expected = F.cross_entropy(
        flat_logits, flat_target, ignore_index=0, label_smoothing=0.1, reduction="sum"
    )
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(gradient, expected_gradient)
    expected_nll = F.cross_entropy(flat_logits, flat_target, ignore_index=0, reduction="sum")
    torch.testing.assert_close(nll, expected_nll.detach())
    assert not nll.requires_grad


def test_label_smoothed_loss_in_blocks_with_bf16_logits_matches_autograd(monkeypatch):
    """More tokens than one block of rows, bf16 logits as under autocast, every 4th token padding."""
    import qkv.loss

    monkeypatch.setattr(qkv.loss, "CPU_BLOCK_VALUES", 3 * 50)  # blocks of 3 rows of a 50-word vocab
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 50).bfloat16().requires_grad_()
    target = torch.randint(1, 50, (4, 5))
    target[:, ::4] = 0
    loss, nll = label_smoothed_loss(logits, target, epsilon=0.2, pad_id=0)
    loss.backward()
    reference_logits = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(
        reference_logits.flatten(0, 1),
        target.flatten(),
        ignore_index=0,
        label_smoothing=0.2,
        reduction="sum",
    )
    expected.backward()
    torch.testing.assert_close(loss, expected)
    expected_nll = F.cross_entropy(
        reference_logits.detach().flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum"
    )
    torch.testing.assert_close(nll, expected_nll)
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad, rtol=1e-2, atol=4e-3)
    assert logits.grad.flatten(0, 1)[target.flatten() == 0].abs().sum() == 0  # padding: no gradient
