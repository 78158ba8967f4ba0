import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention import Attention, LowRankLinear, svd_factors

VARIANTS = ["", "q", "k", "v", "o", "kv", "qk", "qkv", "vq", "qkvo"]


def make_attention(latent="", dim=32, heads=4, rank=8):
    torch.manual_seed(0)
    return Attention(dim, heads, latent=latent, latent_dim=rank)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def plain_attention(q, k, v):
    """Softmax attention written out, the oracle for F.scaled_dot_product_attention."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_sdpa_matches_softmax_written_out():
    q, k, v = torch.randn(3, 2, 4, 5, 16).unbind(0)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v), plain_attention(q, k, v))


@pytest.mark.parametrize("latent", VARIANTS)
def test_every_variant_equals_its_projections_with_the_softmax_written_out(latent, monkeypatch):
    """The reference: each projection module called on its own, then plain_attention."""
    attn, x = make_attention(latent), torch.randn(3, 7, 32)
    with sdpa_kernel(SDPBackend.MATH):
        math_kernel = attn(x)
    monkeypatch.setattr(F, "scaled_dot_product_attention", plain_attention)
    reference = attn(x)
    torch.testing.assert_close(attn(x), math_kernel, atol=1e-5, rtol=1e-5)
    heads = [t.reshape(3, 7, 4, 8).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x))]
    by_hand = attn.to_out(plain_attention(*heads).transpose(1, 2).reshape(3, 7, 32))
    torch.testing.assert_close(reference, by_hand, atol=1e-6, rtol=1e-6)
    monkeypatch.undo()
    torch.testing.assert_close(attn(x), by_hand, atol=1e-5, rtol=1e-5)  # the default SDPA kernel


@pytest.mark.parametrize("latent", ["q", "k", "v", "o", "kv", "qk", "qkv", "qkvo"])
def test_each_compressed_projection_saves_12288_at_rank_64(latent):
    full = n_params(Attention(192, 12))
    assert full - n_params(Attention(192, 12, latent=latent, latent_dim=64)) == 12_288 * len(latent)


@pytest.mark.parametrize("latent", ["q", "kv", "qkv", "o"])
def test_latent_projections_have_rank_r(latent):
    attn = make_attention(latent, rank=5)
    for letter in latent:
        proj = getattr(attn, "to_out" if letter == "o" else f"to_{letter}")
        assert proj.down.bias is None and proj.up.bias is not None
        assert torch.linalg.matrix_rank(proj.up.weight @ proj.down.weight) == 5


def test_rank_is_ignored_without_latent_projections():
    assert n_params(Attention(32, 4, latent="", latent_dim=64)) == n_params(Attention(32, 4))


def test_letter_order_does_not_matter():
    a, b = make_attention("qv"), make_attention("vq")
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=32, heads=5), "heads=5"),
        (dict(dim=32, heads=4, latent="q", latent_dim=0), "latent_dim=0"),
        (dict(dim=32, heads=4, latent="q", latent_dim=33), "latent_dim=33"),
        (dict(dim=32, heads=4, latent="qx"), "latent='qx'"),
        (dict(dim=32, heads=4, latent="qq"), "latent='qq'"),
    ],
)
def test_invalid_settings_raise_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)


def test_attention_probs_are_distributions_and_give_the_output():
    attn, x = make_attention("kv"), torch.randn(2, 6, 32)
    probs = attn.attention_probs(x)
    assert probs.shape == (2, 4, 6, 6) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    _, _, v = attn.heads_qkv(x)
    heads_out = torch.einsum("b h i j, b h j d -> b h i d", probs, v)
    out = attn.to_out(heads_out.permute(0, 2, 1, 3).reshape(2, 6, 32))
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_svd_factors_give_the_best_rank_r_approximation(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    for rank in (1, 5, min(shape)):
        up, down = svd_factors(weight, rank)
        assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
        explicit = (u[:, :rank] * s[:rank] @ vh[:rank]).float()
        torch.testing.assert_close(up @ down, explicit, atol=1e-5, rtol=1e-5)
        # Eckart-Young: the Frobenius error is the norm of the dropped singular values.
        error = torch.linalg.matrix_norm((up @ down).double() - weight.double())
        assert error.item() == pytest.approx(s[rank:].norm().item(), abs=1e-4)
        # The split is even: both factors carry sqrt(S).
        torch.testing.assert_close(torch.linalg.svdvals(up.double()), s[:rank].sqrt(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.matmul(*svd_factors(weight, min(shape))), weight, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=f"rank={min(shape) + 1}"):
        svd_factors(weight, min(shape) + 1)


def test_low_rank_modules_load_a_dense_map_by_truncated_svd():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(20, 12, generator=g), torch.randn(20, generator=g)
    low = LowRankLinear(12, 20, rank=4)
    low.load_dense(weight, bias)
    dense_weight, dense_bias = low.dense()
    torch.testing.assert_close(dense_weight, torch.matmul(*svd_factors(weight, 4)))
    assert torch.equal(dense_bias, bias) and low.down.bias is None
    x = torch.randn(3, 12, generator=g)
    torch.testing.assert_close(low(x), x @ dense_weight.T + bias)
