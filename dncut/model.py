"""The self-supervised dense learning model (paper Sec. 3.3, Fig. 2).

One forward takes both views of a batch to the NCut eigenvectors of their aligned maps::

    view1, view2 (B, 3, S, S) --shared encoder Phi--> (2B, C, h, w)
        --projector g--> target maps t (2B, P, h, w) --predictor q--> online maps o
        --RoIAlign onto the overlap box (flips undone)--> (2B, P, s, s)
        --NCut--> z_online (2B, s*s) [grad], z_target (2B, s*s) [no grad]

Branch pairing (BYOL-style asymmetry, symmetrised): direction ``ab`` compares the online
map of view 1 with the target map of view 2, direction ``ba`` the online map of view 2 with
the target map of view 1. The target side runs without gradient (stop-grad, Eq. 10), so the
encoder learns through the online branch only; no momentum encoder.

``projector=False`` (Table 5 ablation "w/o projector") makes g and q identities.

Encoder BatchNorm (CNN backbones; ViTs have none): with ``freeze_encoder_bn`` (config
``model.freeze_encoder_bn``) ``train()`` keeps the encoder's BatchNorm layers in eval mode, so
their running statistics stay the pretrained ones, while the rest trains (the projector's BN
included). The model is built in train mode, so the policy holds from the first step.

Views enter as uint8 RGB ``(B, 3, S, S)`` (or floats in [0, 1]); the encoder normalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dncut.config import NCutConfig
from dncut.losses import BranchPair
from dncut.ncut import normalized_cut
from dncut.views import align_to_overlap, overlap_boxes


def conv_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """1x1-conv MLP: conv -> BatchNorm -> GELU -> conv, (B, in, h, w) -> (B, out, h, w)."""
    return nn.Sequential(
        nn.Conv2d(in_dim, hidden_dim, 1),
        nn.BatchNorm2d(hidden_dim),
        nn.GELU(),
        nn.Conv2d(hidden_dim, out_dim, 1),
    )


@dataclass
class TwoViewOutput:
    """What :class:`DenseNCutModel` returns for a batch of B image pairs.

    Attributes:
        ab: direction online view 1 vs target view 2 (``z_* (B, s*s)``, ``f_* (B, P, s, s)``).
        ba: direction online view 2 vs target view 1.
        shape: (s, s), the aligned grid.
        n_fallback: items the NCut solver handed to the exact solver.
    """

    ab: BranchPair
    ba: BranchPair
    shape: tuple[int, int]
    n_fallback: int = 0


class DenseNCutModel(nn.Module):
    """Shared encoder + projector g + predictor q, two views to aligned NCut eigenvectors.

    Args:
        encoder: a :class:`dncut.backbones.Backbone` (``(B, 3, H, W) -> (B, C, H/s, W/s)``,
            attributes ``channels``, ``stride``).
        align_size: side of the aligned overlap grid (crop size / stride: 14 for ViT-S/16).
        proj_dim: output channels of g and q (256).
        hidden_dim: hidden channels of g and q (default: encoder channels).
        projector: use g and q (False: Table 5 ablation, identities).
        ncut: graph options (``Config.ncut``; default ``NCutConfig()``).
        freeze_encoder_bn: keep the encoder's BatchNorm running statistics (``model.freeze_encoder_bn``).
    """

    def __init__(self, encoder: nn.Module, *, align_size: int, proj_dim: int = 256,
                 hidden_dim: int | None = None, projector: bool = True,
                 ncut: NCutConfig | None = None, freeze_encoder_bn: bool = False) -> None:
        super().__init__()
        if align_size < 2:
            raise ValueError(f"align_size must be >= 2 (a graph needs 2 nodes), got {align_size}")
        self.encoder = encoder
        channels = encoder.channels
        hidden = hidden_dim or channels
        self.projector = conv_mlp(channels, hidden, proj_dim) if projector else nn.Identity()
        self.predictor = conv_mlp(proj_dim, hidden, proj_dim) if projector else nn.Identity()
        self.align_size = align_size
        self.ncut = ncut or NCutConfig()
        self.freeze_encoder_bn = freeze_encoder_bn
        self.train()

    def train(self, mode: bool = True) -> "DenseNCutModel":
        """Train mode; with ``freeze_encoder_bn`` the encoder's BatchNorm layers stay in eval mode
        (running statistics fixed, affine weights still trained). DDP's ``train()`` calls this."""
        super().train(mode)
        if self.freeze_encoder_bn:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _ncut(self, maps: Tensor) -> tuple[Tensor, int]:
        """maps (N, P, s, s) -> z2 (N, s*s)."""
        feats = maps.flatten(2).transpose(1, 2)  # (N, s*s, P)
        out = normalized_cut(feats.float(), affinity=self.ncut.affinity, tau=self.ncut.tau,
                             laplacian=self.ncut.laplacian, solver=self.ncut.solver)
        return out.eigvec, out.n_fallback

    def forward(self, view1: Tensor, view2: Tensor, box1: Tensor, box2: Tensor,
                flip1: Tensor, flip2: Tensor) -> TwoViewOutput:
        """Both directions of the symmetrised loss.

        Args:
            view1, view2: ``(B, 3, S, S)`` RGB crops, uint8 or float in [0, 1] (not normalised).
            box1, box2: ``(B, 4)`` crop boxes in original-image pixels.
            flip1, flip2: ``(B,)`` bool, whether each crop was mirrored.
        """
        b = view1.shape[0]
        feats = self.encoder(torch.cat([view1, view2]))  # (2B, 3, S, S) RGB -> (2B, C, h, w)
        target = self.projector(feats)  # (2B, P, h, w)
        online = self.predictor(target)  # (2B, P, h, w)
        overlap = overlap_boxes(box1, box2)  # (B, 4)
        boxes = torch.cat([box1, box2])  # (2B, 4)
        flips = torch.cat([flip1, flip2]).bool()  # (2B,)
        both = torch.cat([overlap, overlap])  # (2B, 4)
        s = self.align_size
        on = align_to_overlap(online.float(), boxes, both, flips, s)  # (2B, P, s, s)
        z_on, fb_on = self._ncut(on)  # (2B, s*s)
        with torch.no_grad():
            tg = align_to_overlap(target.detach().float(), boxes, both, flips, s)  # (2B, P, s, s)
            z_tg, fb_tg = self._ncut(tg)  # (2B, s*s)
        ab = BranchPair(z_on[:b], z_tg[b:], on[:b], tg[b:])
        ba = BranchPair(z_on[b:], z_tg[:b], on[b:], tg[:b])
        return TwoViewOutput(ab=ab, ba=ba, shape=(s, s), n_fallback=fb_on + fb_tg)
