import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attention import svd_factors
from model import ViT, ViTConfig, count_parameters, forward_macs, sincos_2d, transfer_weights

TINY = dict(dim=32, depth=2, heads=4, latent_dim=8, mlp_ratio=2.0)
LATENTS = ["", "q", "k", "v", "o", "kv", "qk", "qkv", "qkvo"]


def tiny(**overrides):
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**TINY, **overrides}))


def plain_vit_params(dim=192, depth=9, mlp=384, patch_in=48, tokens=65, classes=10, head_in=192):
    """Parameter count of a plain pre-norm ViT of this shape, from the formula."""
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * mlp + mlp) + (mlp * dim + dim)
    return (patch_in * dim + dim) + dim + tokens * dim + depth * block + 2 * dim + head_in * classes + classes


def test_default_config_matches_plain_vit_parameter_count():
    count = count_parameters(ViT(ViTConfig()))
    assert count == plain_vit_params() == 2_697_610


def test_multi_cls_concat_adds_tokens_positions_and_head_inputs():
    count = count_parameters(ViT(ViTConfig(num_cls=4)))
    assert count == plain_vit_params(tokens=68, head_in=4 * 192) + 3 * 192


@pytest.mark.parametrize("latent", LATENTS[1:])
def test_latent_variant_saves_12288_per_projection_per_block(latent):
    count = count_parameters(ViT(ViTConfig(latent=latent)))
    assert plain_vit_params() - count == 12_288 * 9 * len(latent)


@pytest.mark.parametrize("rank", [32, 64, 128])
def test_low_rank_mlp_saves_the_difference_of_the_factorisations(rank):
    # Each of fc1 (192 -> 384) and fc2 (384 -> 192): 192 * 384 weights become rank * (192 + 384); biases stay.
    count = count_parameters(ViT(ViTConfig(mlp_latent_dim=rank)))
    assert plain_vit_params() - count == 9 * 2 * (192 * 384 - rank * (192 + 384))
    assert plain_vit_params() - count_parameters(ViT(ViTConfig(mlp_latent_dim=64, latent="o"))) == 9 * (
        2 * 36_864 + 12_288)


@pytest.mark.parametrize(
    "latent, num_cls, pool, pos, mlp_rank",
    [
        (latent, num_cls, pool, pos, mlp_rank)
        for latent, num_cls, pool, pos in itertools.product(LATENTS, [1, 4], ["concat", "mean"], ["learned", "sincos"])
        for mlp_rank in ([0, 8] if num_cls == 1 and pool == "concat" else [0])
    ],
)
def test_sdpa_path_matches_plain_softmax_path(latent, num_cls, pool, pos, mlp_rank, monkeypatch):
    model = tiny(latent=latent, num_cls=num_cls, cls_pool=pool, pos_embed=pos, mlp_latent_dim=mlp_rank).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = model(x)
    assert fused.shape == (2, 10)
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v)
    torch.testing.assert_close(fused, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
@pytest.mark.parametrize("latent, mlp_rank", [("", 0), ("q", 0), ("kv", 0), ("qkvo", 8)])
def test_every_parameter_gets_a_gradient(latent, mlp_rank, pos):
    model = tiny(latent=latent, pos_embed=pos, num_cls=2, mlp_latent_dim=mlp_rank)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # A key bias adds the same q.b_k to every logit of a row, which softmax ignores: its gradient is zero.
        if not name.endswith("to_k.up.bias"):
            assert p.grad.abs().sum() > 0, name


def test_sincos_table_is_fixed_and_not_a_parameter():
    model = tiny(pos_embed="sincos", num_cls=3)
    assert "pos_embedding" not in dict(model.named_parameters())
    assert "pos_embedding" not in model.state_dict()
    table = model.pos_embedding[0]
    assert table.shape == (3 + 64, 32)
    assert not table[:3].any()
    torch.testing.assert_close(table[3:], sincos_2d(8, 32))


def seeds_sincos(embed_dim, temperature=10000.0):
    """The seed's build_2d_sincos_position_embedding (models/vit.py:362-377 at 8bb105e), transcribed: its 8x8 grid,
    its meshgrid (whose grid_w is the row), frequencies 1 / temperature^(i / (dim / 4)); then its zero CLS row."""
    grid_w, grid_h = torch.meshgrid(torch.arange(8, dtype=torch.float32), torch.arange(8, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = embed_dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    return torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)


@pytest.mark.parametrize("num_cls", [1, 3])
def test_sincos_table_is_the_seeds_with_zero_cls_positions(num_cls):
    for dim in (32, 192):
        table = ViT(ViTConfig(dim=dim, heads=4, depth=1, pos_embed="sincos", num_cls=num_cls)).pos_embedding[0]
        assert table.shape == (num_cls + 64, dim) and not table[:num_cls].any()
        torch.testing.assert_close(table[num_cls:], seeds_sincos(dim), atol=0, rtol=0)
    # Rows of the patch grid: the first half of the table is constant along a row, the second down a column.
    grid = rearrange(sincos_2d(8, 32), "(h w) d -> h w d", h=8)
    assert torch.equal(grid[2, 0, :16], grid[2, 7, :16]) and torch.equal(grid[0, 3, 16:], grid[7, 3, 16:])
    assert torch.equal(grid[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))


@pytest.mark.parametrize("pool", ["mean", "concat"])
def test_the_head_reads_the_mean_or_the_concatenation_of_the_cls_outputs(pool):
    model, x = tiny(num_cls=3, cls_pool=pool).eval(), torch.randn(2, 3, 32, 32)
    final, head_input = [], []
    model.norm.register_forward_hook(lambda module, args, output: final.append(output))
    model.head.register_forward_pre_hook(lambda module, args: head_input.append(args[0]))
    logits = model(x)
    # The final norm's outputs of the 3 CLS tokens (the first 3 of the sequence), which differ from each other.
    cls = final[0][:, :3]
    assert not torch.allclose(cls[:, 0], cls[:, 1], atol=1e-3) and not torch.allclose(cls[:, 0], cls[:, 2], atol=1e-3)
    # mean: their average; concat: token 0's 32 features, then token 1's, then token 2's.
    expected = (cls[:, 0] + cls[:, 1] + cls[:, 2]) / 3 if pool == "mean" else torch.cat(cls.unbind(1), dim=1)
    torch.testing.assert_close(head_input[0], expected)
    torch.testing.assert_close(logits, expected @ model.head.weight.T + model.head.bias)


def test_an_extra_cls_token_joins_every_attention_block():
    one, two, x = tiny(num_cls=1), tiny(num_cls=2), torch.randn(2, 3, 32, 32)
    # Like for like: two takes every weight of one; its extra CLS token (index 1) keeps its own embedding and
    # position, and the head reads CLS 0 only (the extra token's half of the concatenated input weighs zero).
    weights, theirs = one.state_dict(), two.state_dict()
    weights["cls_tokens"] = torch.cat([weights["cls_tokens"], theirs["cls_tokens"][:, 1:]], dim=1)
    weights["pos_embedding"] = torch.cat([weights["pos_embedding"][:, :1], theirs["pos_embedding"][:, 1:2],
                                          weights["pos_embedding"][:, 1:]], dim=1)
    weights["head.weight"] = torch.cat([weights["head.weight"], torch.zeros(10, 32)], dim=1)
    two.load_state_dict(weights)
    one.eval()
    two.eval()
    with torch.no_grad():
        # The control: two's own modules on its token sequence without the extra token give one's output.
        tokens, _ = two.tokens(x)
        tokens = torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1)
        for block in two.blocks:
            tokens = block(tokens)
        without_extra = two.head(torch.cat([two.norm(tokens)[:, 0], torch.zeros(2, 32)], dim=1))
        torch.testing.assert_close(without_extra, one(x))
        # With it, CLS 0 attends to the extra token (and the patches do), so the output moves.
        assert (two(x) - one(x)).abs().max() > 1e-3


def test_stochastic_depth_rises_linearly_to_drop_path():
    model = tiny(depth=5, drop_path=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_init_follows_recipe():
    torch.manual_seed(0)
    model = ViT(ViTConfig())
    # Trunc-normal std 0.02 (torch cuts at +-2, 100 std: a normal): a sample std of n draws has standard error
    # 0.02 / sqrt(2 n), 7.4e-5 for a 192 x 192 weight (n = 36,864); each std must lie within 5 of them of 0.02
    # (1.8% for those, 8% for the head's 1,920 draws). The 110 checks at 5 standard errors fail by chance with
    # probability ~6e-5 (and the seed is fixed); std 0.019 or 0.021 fails every 192 x 192 one.
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and name != "to_patch_embedding.1"]
    assert len(linears) == 9 * 6 + 1
    for name, linear in linears:
        n = linear.weight.numel()
        assert abs(linear.weight.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * n), name
        assert abs(linear.weight.mean().item()) < 5 * 0.02 / math.sqrt(n), name
        assert not linear.bias.any(), name
    # A normal, not a uniform of the same std: 68.27% of the draws within one std (a uniform: 57.7%), to within
    # 5 binomial standard errors (1.2%).
    q = model.blocks[0].attn.to_q.weight
    inside = (q.abs() < 0.02).double().mean().item()
    assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / q.numel())
    for tokens in (model.cls_tokens, model.pos_embedding):
        assert abs(tokens.std().item() - 0.02) < 5 * 0.02 / math.sqrt(2 * tokens.numel())
    for norm in (model.blocks[0].norm1, model.blocks[8].norm2, model.norm):
        assert norm.eps == 1e-6 and torch.equal(norm.weight, torch.ones(192)) and not norm.bias.any()


@pytest.mark.parametrize("patch_size", [4, 8])
def test_patch_embedding_keeps_the_seeds_conv2d_default_init(patch_size):
    torch.manual_seed(0)
    model = ViT(ViTConfig(patch_size=patch_size))
    conv = torch.nn.Conv2d(3, 192, patch_size, stride=patch_size)
    ours = model.to_patch_embedding[1]
    bound = 1 / math.sqrt(3 * patch_size**2)
    for mine, theirs in ((ours.weight, conv.weight), (ours.bias, conv.bias)):
        # Same range (uniform on +-bound) and the same std within sampling error (5 sigma of a uniform's std).
        assert mine.abs().max() <= bound and mine.abs().max() > 0.95 * bound
        sigma = bound / math.sqrt(15 * mine.numel())  # std of the sample std of n draws of U(-b, b)
        assert abs(mine.std().item() - theirs.std().item()) < 5 * math.sqrt(2) * sigma
        assert abs(mine.std().item() - bound / math.sqrt(3)) < 5 * sigma
    # Every other linear keeps trunc-normal 0.02 with zero bias.
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.15) and not model.head.bias.any()
    assert model.blocks[3].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


def smooth_images(n=32, seed=0):
    """Normalised-looking images with strongly correlated neighbouring pixels, so whitening has work to do."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, 36, 36, generator=g)
    return F.avg_pool2d(noise, 5, stride=1) * 3 + 0.3 * torch.randn(n, 3, 32, 32, generator=g)


def stride1_patches(images, p=4):
    patches = images.unfold(2, p, 1).unfold(3, p, 1)
    return rearrange(patches, "b c h w p1 p2 -> (b h w) (c p1 p2)")


def test_whitening_makes_patch_features_second_moment_identity():
    model, images, eps = tiny(dim=64), smooth_images(), 5e-4
    before = model.to_patch_embedding[1].weight.detach().clone()
    eigvals = model.whiten_patch_embedding(images, eps=eps)
    assert torch.all(eigvals[:-1] >= eigvals[1:])
    linear = model.to_patch_embedding[1]
    # The filters alone: whitening leaves the bias at its init (PyTorch's default is not zero, as the seed's conv's).
    features = (stride1_patches(images) @ linear.weight[:48].T).double()
    moment = features.T @ features / len(features)
    # Exactly diag(lambda / (lambda + eps)): identity up to eps / lambda_min.
    torch.testing.assert_close(moment, torch.diag(eigvals / (eigvals + eps)), atol=1e-4, rtol=1e-4)
    assert (moment - torch.eye(48, dtype=moment.dtype)).abs().max() <= eps / eigvals.min() + 1e-4
    assert torch.equal(linear.weight[48:], before[48:])


def test_whitening_at_patch_8_holds_a_bounded_chunk_of_patches(monkeypatch):
    # 64 px / patch 8 has 57^2 stride-1 patches of 192 values per image: 5 MB in float64. At the old 256 images per
    # chunk that was 1.3 GB; here the chunk may hold 2 images' patches (scaled down to 16 px: 9^2 * 192 * 8 bytes).
    model = ViT(ViTConfig(img_size=16, patch_size=8, dim=192, depth=1, heads=4))
    images, per_image = smooth_images(6)[..., :16, :16].contiguous(), 9 * 9 * 192 * 8
    unfolded, real_unfold = [], F.unfold
    monkeypatch.setattr(F, "unfold", lambda x, p: unfolded.append(real_unfold(x, p)) or unfolded[-1])
    eigvals = model.whiten_patch_embedding(images, chunk_bytes=2 * per_image + 100)
    assert [u.numel() * u.element_size() for u in unfolded] == [2 * per_image] * 3
    # The filters whiten every stride-1 patch of all 6 images (their second moment computed here in one piece).
    features = (stride1_patches(images, p=8) @ model.to_patch_embedding[1].weight[:192].T).double()
    moment = features.T @ features / len(features)
    torch.testing.assert_close(moment, torch.diag(eigvals / (eigvals + 5e-4)), atol=1e-3, rtol=1e-3)


def test_whitening_needs_room_for_every_filter():
    with pytest.raises(ValueError, match="dim=32"):
        tiny(dim=32).whiten_patch_embedding(smooth_images(2))


def test_whitening_is_deterministic_and_independent_of_init():
    a, b = tiny(dim=64), ViT(ViTConfig(**{**TINY, "dim": 64}))
    images = smooth_images()
    a.whiten_patch_embedding(images)
    b.whiten_patch_embedding(images, chunk_bytes=5 * 29 * 29 * 48 * 8)  # 5 images a chunk
    wa, wb = a.to_patch_embedding[1].weight, b.to_patch_embedding[1].weight
    torch.testing.assert_close(wa[:48], wb[:48], atol=1e-6, rtol=1e-6)
    # Eigenvector signs are pinned (largest entry positive), so another device's eigh cannot flip a filter.
    filters = wa[:48].detach()
    assert (filters.gather(1, filters.abs().argmax(1, keepdim=True)) > 0).all()
    assert not torch.equal(wa[48:], wb[48:])
    assert wa.requires_grad


@pytest.mark.parametrize(
    "overrides",
    [{}, dict(latent="q"), dict(latent="qkv"), dict(latent="kv"), dict(num_cls=4),
     dict(num_cls=3, cls_pool="mean", latent="k"), dict(latent="o"), dict(mlp_latent_dim=8),
     dict(latent="qkvo", mlp_latent_dim=16)],
)
def test_forward_macs_match_torch_flop_counter(overrides):
    model = tiny(**overrides).eval()
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # the math kernel's matmuls are what the counter counts
        model(torch.randn(2, 3, 32, 32))
    assert counter.get_total_flops() == 2 * 2 * forward_macs(model.cfg)


def test_paper_config_costs_about_019_gmac():
    assert forward_macs(ViTConfig()) == pytest.approx(0.19e9, rel=0.02)


def test_rank_is_only_checked_when_a_projection_is_latent():
    # At dim 32 the default latent_dim 64 is no valid rank (1..32): harmless until a projection is low-rank.
    assert ViTConfig(dim=32, heads=4).latent_dim == 64
    with pytest.raises(ValueError, match=r"latent_dim=64 must be in 1\.\.32"):
        ViTConfig(dim=32, heads=4, latent="q")


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(dim=30, heads=4), "heads=4"),
        (dict(latent="q", latent_dim=0), "latent_dim=0"),
        (dict(latent="kv", latent_dim=193), "latent_dim=193"),
        (dict(latent="qa"), "latent='qa'"),
        (dict(cls_pool="max"), "cls_pool='max'"),
        (dict(pos_embed="rope"), "pos_embed='rope'"),
        (dict(num_cls=0), "num_cls=0"),
        (dict(patch_size=5), "patch_size=5"),
        (dict(drop_path=1.0), "drop_path=1.0"),
        (dict(mlp_latent_dim=-1), "mlp_latent_dim=-1"),
        (dict(dim=32, heads=4, mlp_ratio=0.5, mlp_latent_dim=17), "mlp_latent_dim=17 must be in 0..16"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        ViTConfig(**overrides)


def logits(model, x):
    return model.eval()(x)


FULL_RANK = dict(latent="qkvo", latent_dim=32, mlp_latent_dim=32)


@pytest.mark.parametrize("target", [FULL_RANK, {}], ids=["every-projection-low-rank", "full"])
def test_transfer_at_full_rank_reproduces_the_logits(target):
    source, x = tiny(num_cls=2), torch.randn(4, 3, 32, 32)
    compressed = tiny(num_cls=2, **target)
    transfer_weights(source, compressed)
    assert (logits(compressed, x) - logits(source, x)).abs().max() <= 1e-5
    # And back: a full-rank model takes the product up @ down of each latent projection.
    restored = tiny(num_cls=2)
    transfer_weights(compressed, restored)
    assert (logits(restored, x) - logits(source, x)).abs().max() <= 1e-5


def test_transfer_at_rank_r_equals_the_truncated_svd_of_every_projection():
    torch.manual_seed(1)
    source, x = tiny(), torch.randn(4, 3, 32, 32)
    compressed = tiny(latent="qkvo", latent_dim=5, mlp_latent_dim=7)
    transfer_weights(source, compressed)
    # The same model built by hand: every matrix of a full-rank copy replaced by its rank-r truncation.
    expected = tiny()
    expected.load_state_dict(source.state_dict())
    with torch.no_grad():
        for block in expected.blocks:
            for name, module in [("q", block.attn.to_q), ("k", block.attn.to_k), ("v", block.attn.to_v),
                                 ("o", block.attn.to_out), ("fc1", block.mlp.fc1), ("fc2", block.mlp.fc2)]:
                module.weight.copy_(torch.matmul(*svd_factors(module.weight, 7 if name.startswith("fc") else 5)))
    torch.testing.assert_close(logits(compressed, x), logits(expected, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(compressed, x), logits(source, x), atol=1e-3)
    up, down = compressed.blocks[1].attn.to_q.up, compressed.blocks[1].attn.to_q.down
    assert torch.equal(up.bias, source.blocks[1].attn.to_q.bias)
    # The split is even: up = U sqrt(S) and down = sqrt(S) V^T have the same singular values.
    torch.testing.assert_close(torch.linalg.svdvals(up.weight), torch.linalg.svdvals(down.weight))


def test_transfer_refuses_a_model_of_another_shape():
    with pytest.raises(ValueError, match=r"dim \(32 vs 64\)"):
        transfer_weights(tiny(), tiny(dim=64, latent="q"))
    with pytest.raises(ValueError, match="num_cls"):
        transfer_weights(tiny(), tiny(num_cls=2))
