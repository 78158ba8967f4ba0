import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import analyze
import data
from model import ViT, ViTConfig

TINY = dict(dim=32, depth=2, heads=4, patch_size=8)


def tiny(**overrides):
    torch.manual_seed(0)
    return ViT(ViTConfig(**{**TINY, **overrides})).eval()


def images(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_spectra_equal_svdvals_of_each_map():
    model = tiny(latent="qkvo", latent_dim=5, mlp_latent_dim=7)
    spectrum = analyze.spectra(model)
    assert set(spectrum) == {(i, name) for i in range(2) for name in analyze.MATRICES}
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    by_hand = {"q": attn.to_q.up.weight @ attn.to_q.down.weight,
               "k": attn.to_k.up.weight @ attn.to_k.down.weight, "v": attn.to_v.up.weight @ attn.to_v.down.weight,
               "o": attn.to_out.up.weight @ attn.to_out.down.weight,
               "fc1": mlp.fc1.up.weight @ mlp.fc1.down.weight, "fc2": mlp.fc2.up.weight @ mlp.fc2.down.weight}
    for name, product in by_hand.items():
        expected = torch.linalg.svdvals(product.detach().double())
        torch.testing.assert_close(spectrum[1, name], expected, atol=1e-6, rtol=1e-6)
        assert (spectrum[1, name][(7 if name.startswith("fc") else 5):] < 1e-6).all()  # rank r: the rest vanish


def test_effective_rank_counts_singular_values_up_to_the_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25: cumulative 63%, 91%, 98%, 100%
    assert [analyze.effective_rank(s, e) for e in (0.5, 0.9, 0.95, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert analyze.effective_rank(torch.ones(8), 0.5) == 4  # exactly half the energy in 4 equal values


def test_truncation_at_full_rank_leaves_the_logits_unchanged():
    # Every matrix of this model has rank 8 of 32: truncating at 8 goes through the SVD and must change nothing.
    model, x = tiny(latent="qkvo", latent_dim=8, mlp_latent_dim=8, num_cls=2), images()
    dense = analyze.full_rank_copy(model)
    assert (dense(x) - model(x)).abs().max() <= 1e-5
    for rank in (8, 32):
        with analyze.truncated(dense, analyze.MATRICES, rank):
            assert (dense(x) - model(x)).abs().max() <= 1e-5
    with analyze.truncated(dense, analyze.MATRICES, rank=7):
        assert (dense(x) - model(x)).abs().max() > 1e-4


def test_rank_r_truncation_is_the_explicit_product_and_drops_the_tail():
    model, x = analyze.full_rank_copy(tiny()), images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = model(x)
    q, fc1 = model.blocks[0].attn.to_q, model.blocks[1].mlp.fc1
    with analyze.truncated(model, ("q", "fc1"), rank=5):
        for linear, original in ((q, before["blocks.0.attn.to_q.weight"]), (fc1, before["blocks.1.mlp.fc1.weight"])):
            u, s, vh = torch.linalg.svd(original.double(), full_matrices=False)
            torch.testing.assert_close(linear.weight.double(), u[:, :5] @ torch.diag(s[:5]) @ vh[:5], atol=1e-5,
                                       rtol=1e-5)
            # Eckart-Young: the Frobenius error is exactly the norm of the dropped singular values.
            error = torch.linalg.matrix_norm(linear.weight.double() - original.double())
            assert error.item() == pytest.approx(math.sqrt(s[5:].square().sum().item()), rel=1e-4)
        assert torch.equal(model.blocks[0].attn.to_k.weight, before["blocks.0.attn.to_k.weight"])
        assert torch.equal(q.bias, before["blocks.0.attn.to_q.bias"])
        assert not torch.allclose(model(x), logits, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_truncation_ranks_run_from_4_to_full_width():
    assert analyze.truncation_ranks(96, 10) == [4, 6, 8, 12, 16, 23, 33, 47, 67, 96]  # 4 * 24 ** (i / 9)
    assert analyze.truncation_ranks(64, 7, smallest=1) == [1, 2, 4, 8, 16, 32, 64]
    assert analyze.truncation_ranks(3, 10) == [3]


def test_cls_attention_maps_are_distributions_over_the_tokens():
    model, x = tiny(num_cls=3), images(4)
    maps = analyze.cls_attention(model, x)
    assert maps.shape == (4, 3, 3 + 16) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(4, 3))
    # By hand: the last block's normalised input, q and k from the weights, softmax per head, mean over heads.
    seen = {}
    model.blocks[1].attn.register_forward_pre_hook(lambda module, inputs: seen.update(x=inputs[0]))
    model(x)
    attn = model.blocks[1].attn
    q, k = (F.linear(seen["x"], m.weight, m.bias).unflatten(-1, (4, 8)).transpose(1, 2) for m in (attn.to_q, attn.to_k))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1).mean(1)
    torch.testing.assert_close(maps, weights[:, :3], atol=1e-6, rtol=1e-5)


def test_analyze_writes_the_report_and_every_plot(trained_run, tmp_path):
    args = analyze.get_args_parser().parse_args([str(trained_run), "--out", str(tmp_path), "--device", "cpu",
                                                 "--images", "120", "--rank-steps", "3", "--cls-images", "3"])
    result = analyze.main(args)
    assert result.ranks == [4, 11, 32]
    # The CLS attention figure shows the first test image of classes 0, 1, 2 (the first three are 6, 5, 5).
    labels = data.load_digits().test_labels
    first = [int((labels == c).nonzero()[0]) for c in range(3)]
    assert result.shown_labels.tolist() == [0, 1, 2]
    assert torch.equal(result.shown, data.load_digits().test_images[first])
    for family, accs in result.curves.items():
        assert accs[-1] == result.subset_acc, family  # full width: no truncation
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Effective rank", "## Post-hoc rank truncation", "## CLS tokens", "## Per-class accuracy"):
        assert heading in text
    assert f"accuracy {result.result['acc']:.2f}%" in text
    for name in analyze.PLOTS:
        assert f"({name}.png)" in text
        with Image.open(tmp_path / f"{name}.png") as png:
            assert png.size[0] > 200 and png.size[1] > 100


def test_a_damaged_checkpoint_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(analyze.get_args_parser().parse_args([str(tmp_path), "--device", "cpu"]))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and "not a readable checkpoint" in lines[0], lines
    assert not (tmp_path / "analysis").exists()
