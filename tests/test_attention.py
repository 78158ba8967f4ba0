import pytest
import torch

from attention import Attention, plain_attention

VARIANTS = ["", "q", "k", "v", "kv", "qk", "qkv", "vq"]


def make_attention(latent="", shared=False, dim=32, heads=4, rank=8):
    torch.manual_seed(0)
    return Attention(dim, heads, latent=latent, latent_dim=rank, shared_kv_latent=shared)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("latent", VARIANTS)
def test_sdpa_matches_plain_softmax(latent, shared):
    attn = make_attention(latent, shared)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), attn(x, fused=False), atol=1e-5, rtol=1e-5)


def test_plain_attention_uses_inverse_sqrt_head_dim_scale():
    q, k, v = torch.randn(3, 2, 4, 5, 16).unbind(0)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(plain_attention(q, k, v), weights @ v)


@pytest.mark.parametrize("latent", ["q", "k", "v", "kv", "qk", "qkv"])
def test_each_compressed_projection_saves_12288_at_rank_64(latent):
    full = n_params(Attention(192, 12))
    assert full - n_params(Attention(192, 12, latent=latent, latent_dim=64)) == 12_288 * len(latent)


def test_shared_kv_latent_saves_one_more_down_projection():
    separate = n_params(Attention(192, 12, latent="kv", latent_dim=64))
    shared = n_params(Attention(192, 12, latent="kv", latent_dim=64, shared_kv_latent=True))
    assert separate - shared == 192 * 64
    assert n_params(Attention(192, 12)) - shared == 3 * 12_288


def test_shared_kv_latent_needs_both_k_and_v():
    assert n_params(make_attention("k", shared=True)) == n_params(make_attention("k"))


@pytest.mark.parametrize("latent", ["q", "kv", "qkv"])
def test_latent_projections_have_rank_r(latent):
    attn = make_attention(latent, rank=5)
    for letter in latent:
        proj = getattr(attn, f"to_{letter}")
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
        (dict(dim=32, heads=4, latent="q", latent_dim=32), "latent_dim=32"),
        (dict(dim=32, heads=4, latent="qx"), "latent='qx'"),
        (dict(dim=32, heads=4, latent="qq"), "latent='qq'"),
    ],
)
def test_invalid_settings_raise_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Attention(**kwargs)
