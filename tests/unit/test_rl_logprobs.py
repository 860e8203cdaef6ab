"""token_logprobs_and_entropy and the fused output layer against a float64 textbook reference."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_t1.rl.fused import fused_token_logprobs_and_entropy
from megatron_t1.rl.logprobs import token_logprobs_and_entropy, vocab_shard


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tau: float):
    """Textbook, float64: p = exp(z) / sum exp(z) over the real vocabulary, log p[target], -sum p log p."""
    z = logits[..., :vocab_size].double() / tau
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)  # the shift only avoids overflow
    p = e / e.sum(dim=-1, keepdim=True)
    logp = torch.log(p)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(p * logp).sum(dim=-1)


def _random_case(shape=(3, 5), v_pad=21, vocab_size=17, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v_pad, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab_size, shape, generator=g)
    g_lp, g_h = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return logits, targets, g_lp, g_h


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("tau", [1.0, 1.2])
def test_matches_float64_reference_values_and_gradients(chunk_size, tau):
    logits, targets, g_lp, g_h = _random_case()
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(x, targets, vocab_size=17, chunk_size=chunk_size, temperature=tau)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == targets.shape
    (lp * g_lp + ent * g_h).sum().backward()

    xr = logits.double().requires_grad_(True)
    lr, hr = reference(xr, targets, 17, tau)
    (lr * g_lp.double() + hr * g_h.double()).sum().backward()
    torch.testing.assert_close(lp.double(), lr, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), hr, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=2e-6, rtol=1e-5)
    assert torch.all(x.grad[..., 17:] == 0), "padded vocabulary rows must get no gradient"


def test_closed_form_uniform_and_two_token_cases():
    # Equal logits over the real vocabulary (whatever sits in the padding): log p = -log V, H = log V.
    v, v_pad = 11, 16
    logits = torch.full((4, v_pad), 0.7)
    logits[:, v:] = 50.0  # padding that would dominate if it were not masked
    lp, ent = token_logprobs_and_entropy(logits, torch.tensor([0, 3, 7, 10]), vocab_size=v)
    torch.testing.assert_close(lp, torch.full((4,), -math.log(v)))
    torch.testing.assert_close(ent, torch.full((4,), math.log(v)))
    # Two tokens with logits (a, b) at temperature tau: p = sigmoid((a - b) / tau), H = binary entropy.
    a, b, tau = 1.3, -0.4, 1.7
    lp, ent = token_logprobs_and_entropy(torch.tensor([[a, b]]), torch.tensor([0]), temperature=tau)
    p = 1 / (1 + math.exp(-(a - b) / tau))
    assert lp.item() == pytest.approx(math.log(p), abs=1e-6)
    assert ent.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), abs=1e-6)


def test_gradcheck_custom_function():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 9, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randint(0, 7, (5,), generator=g)
    fn = lambda x: token_logprobs_and_entropy(x, t, vocab_size=7, chunk_size=2, temperature=0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    # Only one of the two outputs used: the other's gradient arrives as None.
    assert torch.autograd.gradcheck(lambda x: fn(x)[1], (x,))
    assert torch.autograd.gradcheck(lambda x: fn(x)[0], (x,))


def test_input_untouched_no_grad_and_bf16():
    logits, targets, _, _ = _random_case(dtype=torch.bfloat16)
    before = logits.clone()
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(x, targets, vocab_size=17, chunk_size=2, temperature=1.2)
    (lp.sum() + ent.sum()).backward()
    assert torch.equal(x.detach(), before) and x.grad.dtype == torch.bfloat16
    lr, hr = reference(before, targets, 17, 1.2)  # the bf16 values, computed in float64
    torch.testing.assert_close(lp.double(), lr, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(ent.double(), hr, atol=2e-6, rtol=1e-6)
    with torch.no_grad():
        lp2, _ = token_logprobs_and_entropy(before, targets, vocab_size=17)
    assert not lp2.requires_grad and torch.equal(before, logits)


def test_out_of_range_targets_are_finite_and_shapes_checked():
    logits, targets, _, _ = _random_case()
    targets[0, 0] = -100  # an ignore index at a prompt position
    targets[0, 1] = 19  # a padded id
    lp, ent = token_logprobs_and_entropy(logits, targets, vocab_size=17)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs_and_entropy(logits, targets[:, :2])
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs_and_entropy(logits, targets, vocab_size=22)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_and_entropy(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="without a copy"):
        token_logprobs_and_entropy(logits.transpose(0, 1), targets.t())


def test_vocab_shard_convention():
    assert vocab_shard(8) == (0, 8, 8)
    assert vocab_shard(8, vocab_size=5) == (0, 8, 5)


@pytest.mark.parametrize("chunk_size,vocab_chunk", [(2, 3), (None, None), (7, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_reference(chunk_size, vocab_chunk, dtype):
    g = torch.Generator().manual_seed(2)
    n, hid, v_pad, v = 9, 6, 14, 12
    hidden = torch.randn(3, 3, hid, generator=g).to(dtype)
    weight = (torch.randn(v_pad, hid, generator=g) * 1.5).to(dtype)
    targets = torch.randint(0, v, (3, 3), generator=g)
    g_lp, g_h = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp, ent = fused_token_logprobs_and_entropy(
        h, w, targets, vocab_size=v, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk, temperature=1.2
    )
    (lp * g_lp + ent * g_h).sum().backward()
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    lr, er = reference(hr @ wr.t(), targets, v, 1.2)
    (lr * g_lp.double() + er * g_h.double()).sum().backward()
    # bf16: the reference sees the same bf16 inputs, but the logits of the fused path are bf16 matmuls.
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(lp.double(), lr, **tol)
    torch.testing.assert_close(ent.double(), er, **tol)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
    assert h.grad.dtype == w.grad.dtype == dtype and torch.all(w.grad[v:] == 0)
    assert n == targets.numel()


def test_fused_gradcheck():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randint(0, 8, (5,), generator=g)
    fn = lambda h, w: fused_token_logprobs_and_entropy(  # noqa: E731
        h, w, t, vocab_size=8, chunk_size=2, vocab_chunk_size=3, temperature=0.9
    )
    assert torch.autograd.gradcheck(fn, (h, w))
    assert torch.autograd.gradcheck(lambda h: fn(h, w.detach())[1], (h,))


class _PeakMemory(TorchDispatchMode):
    """Peak bytes of the storages created by ops under this mode (inputs and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = self.peak = 0

    def _sweep(self):
        for key, (ref, size) in list(self.live.items()):
            if ref() is None:
                del self.live[key]
                self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in inputs and key not in self.live:
                    # Tensors (not storages) take weak references: track the output, which owns it.
                    self.live[key] = (weakref.ref(t), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def test_memory_few_chunks_without_grad_and_only_the_gradient_with_grad():
    n, v, chunk = 256, 2048, 8
    logits, targets = torch.randn(n, v) * 3, torch.randint(0, v, (n,))
    size_l, size_chunk = n * v * 4, chunk * v * 4
    with torch.no_grad(), _PeakMemory() as mem:
        token_logprobs_and_entropy(logits, targets, chunk_size=chunk)
    assert mem.peak <= 3 * size_chunk + 64 * n, mem.peak
    x = logits.clone().requires_grad_(True)
    with _PeakMemory() as mem:
        lp, ent = token_logprobs_and_entropy(x, targets, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    assert mem.peak <= size_l + 3 * size_chunk + 64 * n, mem.peak / size_l


def test_fused_memory_is_inputs_grads_plus_tiles():
    n, hid, v, rows, cols = 256, 32, 2048, 16, 256
    h = torch.randn(n, hid).requires_grad_(True)
    w = (torch.randn(v, hid) / hid**0.5).requires_grad_(True)
    t = torch.randint(0, v, (n,))
    with _PeakMemory() as mem:
        lp, ent = fused_token_logprobs_and_entropy(h, w, t, chunk_size=rows, vocab_chunk_size=cols)
        (lp.sum() + ent.sum()).backward()
    grads = (n + v) * hid * 4
    assert mem.peak <= grads + 3 * rows * cols * 4 + 64 * n, mem.peak
    assert mem.peak < n * v * 4 / 4  # far below the logits it never builds


def test_empty_micro_batch():
    x = torch.randn(0, 5, requires_grad=True)
    lp, ent = token_logprobs_and_entropy(x, torch.zeros(0, dtype=torch.long))
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and x.grad.shape == (0, 5)
    h, w = torch.randn(0, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    lp, ent = fused_token_logprobs_and_entropy(h, w, torch.zeros(0, dtype=torch.long))
    (lp.sum() + ent.sum()).backward()
    assert lp.shape == (0,) and torch.equal(w.grad, torch.zeros(5, 3))
