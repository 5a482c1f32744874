"""Projection and prediction heads (MoCo v3 / ConMIM style MLPs with BatchNorm)."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Sequential):
    """``num_layers`` Linear layers without bias; BatchNorm+ReLU after each hidden layer and, when
    ``last_bn``, a BatchNorm without affine after the last (the MoCo v3 projector/predictor and ConMIM's
    projector). Works on (B, D) and on token tensors (B, N, D): BatchNorm statistics then cover all tokens.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 3, last_bn: bool = True):
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                       nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=False))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(*shape[:-1], -1)
