"""Low-rank adaptation (LoRA) of the query and value projections inside a fused ``qkv`` linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRAQKV(nn.Module):
    """Fused qkv projection plus rank-``r`` updates on q (first C outputs) and v (last C outputs).

    Matches M-SAM's ``LoRA_Sam``: no alpha/r scaling (factor 1), no bias, no dropout; A is Kaiming-uniform, B is zero, so
    the wrapped layer initially computes exactly the base projection. Parameter names (``qkv``, ``linear_a_q`` ...)
    follow the M-SAM state dict so checkpoints map one to one.
    """

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        dim = qkv.in_features
        if qkv.out_features != 3 * dim:
            raise ValueError(f"expected a fused qkv layer with {3 * dim} outputs, got {qkv.out_features}")
        self.dim = dim
        self.rank = rank
        self.qkv = qkv
        self.linear_a_q = nn.Linear(dim, rank, bias=False)
        self.linear_b_q = nn.Linear(rank, dim, bias=False)
        self.linear_a_v = nn.Linear(dim, rank, bias=False)
        self.linear_b_v = nn.Linear(rank, dim, bias=False)
        for a in (self.linear_a_q, self.linear_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.linear_b_q, self.linear_b_v):
            nn.init.zeros_(b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        q, k, v = out.split(self.dim, dim=-1)
        q = q + self.linear_b_q(self.linear_a_q(x))
        v = v + self.linear_b_v(self.linear_a_v(x))
        return torch.cat([q, k, v], dim=-1)

    def merged_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the plain qkv weight with both low-rank updates folded in (for export or LoRA-free models)."""
        weight = self.qkv.weight.detach().clone()
        weight[: self.dim] += self.linear_b_q.weight @ self.linear_a_q.weight
        weight[-self.dim :] += self.linear_b_v.weight @ self.linear_a_v.weight
        bias = None if self.qkv.bias is None else self.qkv.bias.detach().clone()
        return weight, bias
