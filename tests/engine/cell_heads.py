"""Hand-built heads shared by the search and greedy tests (answers known exactly)."""

import torch
from torch import nn

C, H, W = 4, 4, 4
S_CELLS = ((1, 1), (1, 2), (3, 3))


class CellLinearHead(nn.Module):
    """logits = <W_k, x> + b_k: additive over cells; counts the feature maps it sees.

    Class 1 (the mistake) reads channel 0 on ``S_CELLS``, class 0 (the truth) reads channel 1
    there with bias ``true_bias``, class 2 is out of the game (bias -10). Dropout is there to prove
    that the searches run the head in eval mode.
    """

    def __init__(self, true_bias: float):
        super().__init__()
        weight = torch.zeros(3, C, H, W)
        for r, c in S_CELLS:
            weight[1, 0, r, c] = 1.0
            weight[0, 1, r, c] = 1.0
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.tensor([true_bias, 0.0, -10.0]))
        self.dropout = nn.Dropout(0.5)
        self.seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.einsum("nchw,kchw->nk", self.dropout(x), self.weight) + self.bias
