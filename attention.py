"""Multi-head self-attention for PoorViTs: full projections, or low-rank "latent" ones (the paper's Multi-Head Latent
Attention): each projection named in `latent` (of q, k, v and the output o) is down (dim -> r, no bias) then up
(r -> dim), each with its own latent, or K and V with one shared latent as DeepSeek-V2's (arXiv 2405.04434). Each
projection gives its matrix (`dense`) and takes one (`load_dense`, by truncated SVD where it is low-rank).
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LATENT_LETTERS = "qkvo"


def parse_latent(latent: str) -> set[str]:
    """Which of q, k, v, o are low-rank, from a string such as "", "q", "kv" or "qkvo"."""
    letters = set(latent)
    if not letters <= set(LATENT_LETTERS) or len(letters) != len(latent):
        raise ValueError(f"latent={latent!r}: use each of the letters q, k, v, o at most once (e.g. '', 'q', 'kv', "
                         f"'qkvo')")
    return letters


def check_shape(dim: int, heads: int, latent: str, latent_dim: int) -> set[str]:
    """The latent letters, once heads are known to divide dim and the rank to lie in 1..dim (else ValueError)."""
    if heads <= 0 or dim % heads:
        raise ValueError(f"heads={heads} must be a positive divisor of dim={dim}")
    letters = parse_latent(latent)
    if letters and not 0 < latent_dim <= dim:
        raise ValueError(f"latent_dim={latent_dim} must be in 1..{dim} (dim={dim})")
    return letters


def svd_factors(weight: torch.Tensor, rank: int):
    """(up, down) whose product up @ down is the best rank-`rank` approximation of `weight` in Frobenius norm
    (Eckart-Young): the truncated SVD U S V^T split evenly, up = U sqrt(S), down = sqrt(S) V^T."""
    if not 0 < rank <= min(weight.shape):
        raise ValueError(f"rank={rank} must be in 1..{min(weight.shape)} for a {tuple(weight.shape)} weight")
    # float64: a full-rank split then reproduces the float32 weight to rounding.
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)


class FullRankLinear(nn.Linear):
    """nn.Linear with the interface of the low-rank modules below: the matrix it applies, and taking one."""

    def dense(self):
        return self.weight, self.bias

    @torch.no_grad()
    def load_dense(self, weight, bias):
        self.weight.copy_(weight)
        self.bias.copy_(bias)


class LowRankLinear(nn.Module):
    """A rank-r factorisation of an in_features -> out_features projection: x -> up(down(x))."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features)

    def forward(self, x):
        return self.up(self.down(x))

    def dense(self):
        return self.up.weight @ self.down.weight, self.up.bias

    @torch.no_grad()
    def load_dense(self, weight, bias):
        """up @ down becomes the best approximation of `weight` at this module's rank; up's bias becomes `bias`."""
        up, down = svd_factors(weight, self.down.out_features)
        self.up.weight.copy_(up)
        self.down.weight.copy_(down)
        self.up.bias.copy_(bias)


def projection(in_features: int, out_features: int, rank: int = 0):
    """A full projection (rank 0) or a low-rank one of that rank."""
    return LowRankLinear(in_features, out_features, rank) if rank else FullRankLinear(in_features, out_features)


class Attention(nn.Module):
    """Multi-head self-attention; `latent` names the projections (q, k, v, o) that are low-rank with rank
    `latent_dim`. The softmax runs in F.scaled_dot_product_attention (tests compare it with attention_probs)."""

    def __init__(self, dim: int, heads: int, latent: str = "", latent_dim: int = 64):
        super().__init__()
        letters = check_shape(dim, heads, latent, latent_dim)
        self.heads = heads
        rank = {letter: latent_dim if letter in letters else 0 for letter in LATENT_LETTERS}
        self.to_q = projection(dim, dim, rank["q"])
        self.to_k = projection(dim, dim, rank["k"])
        self.to_v = projection(dim, dim, rank["v"])
        self.to_out = projection(dim, dim, rank["o"])

    def heads_qkv(self, x):
        """q, k, v of x (b, n, dim), each (b, heads, n, head dim)."""
        # k and v before q: autograd sums x's gradient over the three in reverse order, and a run's last bits follow it.
        k, v = self.to_k(x), self.to_v(x)
        return [rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(x), k, v)]

    def forward(self, x):
        out = F.scaled_dot_product_attention(*self.heads_qkv(x))  # scale 1/sqrt(head dim), as attention_probs
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def attention_probs(self, x):
        """The attention weights of x: (b, heads, n, n), softmax(q k^T / sqrt(head dim)), rows over the n tokens."""
        q, k, _ = self.heads_qkv(x)
        return (torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def dense(self) -> dict:
        """{letter: (weight, bias)} of q, k, v, o: the map each applies (a low-rank one as up @ down)."""
        return {"q": self.to_q.dense(), "k": self.to_k.dense(), "v": self.to_v.dense(), "o": self.to_out.dense()}

    def load_dense(self, dense: dict):
        """Takes the maps of `dense` (as `dense()` gives them), each by truncated SVD where it is low-rank."""
        self.to_q.load_dense(*dense["q"])
        self.to_k.load_dense(*dense["k"])
        self.to_v.load_dense(*dense["v"])
        self.to_out.load_dense(*dense["o"])
