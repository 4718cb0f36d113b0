"""Pure tensor maths of upcycling (no I/O): expert layout, slices, router rows, drop-upcycling, noise.

Dense SwiGLU ``f(x) = W_d[act(W_g x) * (W_u x)]`` with F neurons is a sum over neuron slices. The
FFN is cut into ``G`` slices of ``F/G`` neurons; ``S`` of them form the shared expert, the other
``R = G - S`` are routed. Copy ``n`` of the routed part becomes experts ``n*R .. n*R+R-1`` (a
"virtual group") that share one router row, so top-K with ``K = m*R`` and renormalised weights picks
whole groups and each group's weights sum to ``1/m``. Scaling each routed ``down_proj`` by
``alpha = R`` makes the routed output exactly the dense routed part, for any router whose groups do
not tie (DESIGN.md section 6).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from moe_patch.errors import MoEConfigError

GATE, UP, DOWN = 0, 1, 2


@dataclass(frozen=True)
class ExpertLayout:
    """How the dense FFN's neurons map onto experts; pure arithmetic, validated on construction."""

    ffn_width: int  # F: dense intermediate size
    num_experts: int  # E: routed experts per MoE layer
    top_k: int  # K: routed experts per token
    granularity: int = 1  # G: slices per dense FFN
    shared_slices: int = 0  # S: slices that form the shared expert

    def __post_init__(self) -> None:
        F, E, K, G, S = self.ffn_width, self.num_experts, self.top_k, self.granularity, self.shared_slices
        if G < 1 or K < 1 or E < 1:
            raise MoEConfigError(f"--num-experts {E}, --top-k {K}, --granularity {G}: all must be >= 1.")
        if E < K:
            raise MoEConfigError(f"--num-experts {E} < --top-k {K}: a token cannot use more experts than exist.")
        if F % G:
            raise MoEConfigError(
                f"--granularity {G} does not divide the FFN width (config.json intermediate_size={F}); "
                f"use a divisor of {F}, e.g. {', '.join(str(d) for d in _divisors(F)[:6])}."
            )
        if not 0 <= S < G:
            raise MoEConfigError(
                f"--shared-experts {S} must be smaller than --granularity {G}: the shared expert takes {S} of "
                f"the {G} slices and at least one slice must stay routed."
            )
        R = G - S
        if E % R or K % R:
            raise MoEConfigError(
                f"--num-experts {E} and --top-k {K} must be multiples of the routed slices per copy "
                f"(granularity {G} - shared {S} = {R}) so that experts of one copy are always chosen together."
            )

    @property
    def routed_slices(self) -> int:
        return self.granularity - self.shared_slices

    @property
    def copies(self) -> int:
        return self.num_experts // self.routed_slices

    @property
    def groups_per_token(self) -> int:
        return self.top_k // self.routed_slices

    @property
    def slice_width(self) -> int:
        return self.ffn_width // self.granularity

    @property
    def shared_width(self) -> int:
        return self.shared_slices * self.slice_width

    @property
    def alpha(self) -> float:
        """down_proj scale of routed experts: renormalised weights of one group sum to 1/routed_slices."""
        return float(self.routed_slices)

    def expert(self, e: int) -> tuple[int, int]:
        """(copy, slice) of routed expert ``e``; slices index the full FFN (shared slices come first)."""
        return e // self.routed_slices, self.shared_slices + e % self.routed_slices

    def neurons(self, slice_index: int) -> slice:
        f = self.slice_width
        return slice(slice_index * f, (slice_index + 1) * f)

    @property
    def shared_neurons(self) -> slice:
        return slice(0, self.shared_width)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def seeded_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, parts): results do not depend on write order."""
    digest = hashlib.sha256("/".join(str(p) for p in (seed, *parts)).encode()).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def expand_router(group_rows: torch.Tensor, routed_slices: int) -> torch.Tensor:
    """Repeat each copy's router row for the experts of its virtual group: [C,H] -> [C*R,H]."""
    return group_rows.repeat_interleave(routed_slices, dim=0).contiguous()


def random_router_rows(copies: int, hidden: int, std: float, seed: int, layer: int) -> torch.Tensor:
    gen = seeded_generator(seed, "router", layer)
    return torch.randn(copies, hidden, generator=gen, dtype=torch.float32) * std


def drop_mask(ffn_width: int, ratio: float, seed: int, layer: int, copy: int) -> torch.Tensor:
    """Boolean mask of the neurons drop-upcycling re-initialises in one copy (a fresh subset per copy)."""
    n_drop = round(ratio * ffn_width)
    mask = torch.zeros(ffn_width, dtype=torch.bool)
    if n_drop:
        perm = torch.randperm(ffn_width, generator=seeded_generator(seed, "drop", layer, copy))
        mask[perm[:n_drop]] = True
    return mask


def reinit_neurons(
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: float,
    std: float,
    *,
    neuron_dim: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Drop-upcycling: resample the masked neurons (rows of gate/up, columns of down) from N(mean, std)."""
    if not bool(mask.any()):
        return weight
    out = weight.clone()
    idx = mask.nonzero().flatten()
    shape = list(weight.shape)
    shape[neuron_dim] = idx.numel()
    fresh = torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean
    out.index_copy_(neuron_dim, idx, fresh.to(out.dtype))
    return out


def add_noise(weight: torch.Tensor, rel_std: float, tensor_std: float, gen: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise with standard deviation ``rel_std * tensor_std`` (relative to the dense tensor)."""
    if rel_std <= 0:
        return weight
    return weight + torch.randn(weight.shape, generator=gen, dtype=torch.float32) * (rel_std * tensor_std)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update ``scaling * B @ A`` a LoRA adapter adds to a weight, in fp32."""
    return (lora_b.float() @ lora_a.float()) * scaling


def spherical_kmeans(x: torch.Tensor, k: int, *, seed: int, iters: int = 30) -> torch.Tensor:
    """Unit-norm centroids of ``k`` clusters of the directions of ``x`` [T,H] (k-means++ init, seeded).

    Cosine k-means matches routing: a router scores tokens by dot products with its rows.
    """
    if x.shape[0] < k:
        raise MoEConfigError(
            f"calibration gave {x.shape[0]} tokens, fewer than the {k} clusters needed; supply more text."
        )
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = seeded_generator(seed, "kmeans")
    centroids = [xn[torch.randint(xn.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, k):  # k-means++: next centre far (in cosine distance) from the chosen ones
        sims = xn @ torch.stack(centroids).T
        dist = (1 - sims.max(dim=1).values).clamp_min(0) + 1e-12
        centroids.append(xn[torch.multinomial(dist, 1, generator=gen)].squeeze(0))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (xn @ c.T).argmax(dim=1)
        new = torch.zeros_like(c).index_add_(0, assign, xn)
        empty = new.norm(dim=1) == 0
        if bool(empty.any()):  # re-seed empty clusters with the worst-served tokens
            worst = (xn @ c.T).max(dim=1).values.argsort()[: int(empty.sum())]
            new[empty] = xn[worst]
        new = torch.nn.functional.normalize(new, dim=-1)
        if torch.allclose(new, c):
            break
        c = new
    return c


def principal_directions(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` principal directions of ``x`` [T,H], signs fixed (largest entry positive) for determinism."""
    if k > min(x.shape):
        raise MoEConfigError(
            f"router init 'pca' needs {k} principal directions but the calibration data spans at most "
            f"{min(x.shape)} (tokens x hidden_size); use more calibration tokens or --router-init kmeans."
        )
    xc = x.float() - x.float().mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:k]
    sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
    return v * sign


def scale_router_rows(rows: torch.Tensor, x: torch.Tensor, target_std: float = 1.0) -> torch.Tensor:
    """Scale router rows so the router logits on the calibration tokens have standard deviation ``target_std``."""
    logits = x.float() @ rows.T
    std = float(logits.std())
    return rows * (target_std / std) if std > 0 else rows
