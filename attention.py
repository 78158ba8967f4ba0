"""Multi-head self-attention for PoorViTs: full projections, or low-rank "latent" ones.

Low-rank projections are the paper's Multi-Head Latent Attention (arXiv 2501.06220, Sec. 3): every projection named
in `latent` becomes down (dim -> r, no bias) then up (r -> dim, with bias), each with its own latent. DeepSeek-V2
(arXiv 2405.04434) instead shares one latent between K and V; `shared_kv_latent=True` offers that.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

LATENT_LETTERS = "qkv"


def parse_latent(latent: str) -> set[str]:
    """Which of q, k, v are low-rank, from a string such as "", "q", "kv" or "vqk"."""
    letters = set(latent)
    if not letters <= set(LATENT_LETTERS) or len(letters) != len(latent):
        raise ValueError(f"latent={latent!r}: use each of the letters q, k, v at most once (e.g. '', 'q', 'kv', 'qkv')")
    return letters


class LowRankLinear(nn.Module):
    """A rank-r factorisation of a dim x dim projection: x -> up(down(x))."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim)


class SharedKVLatent(nn.Module):
    """DeepSeek-V2's joint compression: c_kv = W_dkv x; k = W_uk c_kv; v = W_uv c_kv."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up_k = nn.Linear(rank, dim)
        self.up_v = nn.Linear(rank, dim)


def check_shape(dim: int, heads: int, latent: str, latent_dim: int) -> set[str]:
    """The latent letters, once heads are known to divide dim and the rank to lie below dim (else ValueError)."""
    if heads <= 0 or dim % heads:
        raise ValueError(f"heads={heads} must be a positive divisor of dim={dim}")
    letters = parse_latent(latent)
    if letters and not 0 < latent_dim < dim:
        raise ValueError(f"latent_dim={latent_dim} must be in 1..{dim - 1} (below dim={dim})")
    return letters


def plain_attention(q, k, v):
    """Softmax attention written out; the oracle for F.scaled_dot_product_attention."""
    scale = q.shape[-1] ** -0.5
    attn = torch.einsum("b h i d, b h j d -> b h i j", q, k) * scale
    return torch.einsum("b h i j, b h j d -> b h i d", attn.softmax(dim=-1), v)


class Attention(nn.Module):
    """Multi-head self-attention; `latent` names the projections (q, k, v) that are low-rank with rank `latent_dim`."""

    def __init__(self, dim: int, heads: int, latent: str = "", latent_dim: int = 64, shared_kv_latent: bool = False):
        super().__init__()
        letters = check_shape(dim, heads, latent, latent_dim)
        self.heads = heads
        self.fused_qkv = not letters
        self.shared_kv = shared_kv_latent and {"k", "v"} <= letters

        def projection(letter):
            return LowRankLinear(dim, latent_dim) if letter in letters else nn.Linear(dim, dim)

        if self.fused_qkv:
            # One fused matmul for q, k and v: the fast path of the full-rank baseline.
            self.to_qkv = nn.Linear(dim, 3 * dim)
        elif self.shared_kv:
            self.to_q = projection("q")
            self.to_kv = SharedKVLatent(dim, latent_dim)
        else:
            self.to_q, self.to_k, self.to_v = projection("q"), projection("k"), projection("v")
        self.to_out = nn.Linear(dim, dim)

    def projection_groups(self):
        """(reader, ups) pairs in q, k, v order: `reader` is the linear that reads x (a full projection or a
        down-projection); each up-projection in `ups` (None: none) turns its output into one of q, k, v."""
        if self.shared_kv:
            return [self._group(self.to_q), (self.to_kv.down, [self.to_kv.up_k, self.to_kv.up_v])]
        return [self._group(p) for p in (self.to_q, self.to_k, self.to_v)]

    @staticmethod
    def _group(projection):
        return (projection.down, [projection.up]) if isinstance(projection, LowRankLinear) else (projection, [None])

    def project_qkv(self, x, fused: bool = True):
        if self.fused_qkv:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            groups = self.projection_groups()
            readers = [reader for reader, _ in groups]
            # On (b n, d) rows the up-projections of the codes' column slices run as single addmm calls.
            rows = rearrange(x, "b n d -> (b n) d")
            if fused:
                # One matmul for every linear that reads x, instead of up to three small ones.
                weight = torch.cat([r.weight for r in readers])
                # Down-projections have no bias: with only those, skip adding a zero bias.
                bias = None
                if any(r.bias is not None for r in readers):
                    bias = torch.cat([r.weight.new_zeros(r.out_features) if r.bias is None else r.bias for r in readers])
                codes = F.linear(rows, weight, bias).split([r.out_features for r in readers], dim=-1)
            else:
                codes = [reader(rows) for reader in readers]
            qkv = (code if up is None else up(code) for code, (_, ups) in zip(codes, groups) for up in ups)
            q, k, v = (rearrange(t, "(b n) d -> b n d", b=x.shape[0]) for t in qkv)
        return (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))

    def forward(self, x, fused: bool = True):
        """fused=False computes the same function the plain way (separate matmuls, written-out softmax): an oracle
        for the tests."""
        q, k, v = self.project_qkv(x, fused)
        # SDPA's default scale is 1/sqrt(head dim), the same as plain_attention's.
        out = F.scaled_dot_product_attention(q, k, v) if fused else plain_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))
