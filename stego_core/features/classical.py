"""The weight-free classical featurizer: multi-scale intensity, gradient, Hessian and vesselness features.

Same contract as a ViT backbone (``crops (B, 1, P, P) -> (B, C, h, w)``), with no weights, so that STEGO can run
meaningfully offline. Built by name (``classical``) through :func:`stego_core.features.backbones.build_backbone`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from stego_core.features.base import Backbone, BackboneSpec, to_model_input

__all__ = ["CLASSICAL_SIGMAS_VOX", "ClassicalFeaturizer", "gaussian_derivative_kernels"]

#: Gaussian scales of the classical featurizer, in voxels of the crop.
CLASSICAL_SIGMAS_VOX = (0.5, 1.0, 2.0, 3.0)


def gaussian_derivative_kernels(sigma: float) -> torch.Tensor:
    """Correlation kernels (3, K) for the 0th, 1st and 2nd Gaussian derivative at scale ``sigma`` (voxels).

    Moment-normalised so that on the sampled grid they give exactly 1 for a constant, ``x`` and ``x**2 / 2``
    (a sampled Gaussian with ``sigma`` below one voxel is otherwise far from normalised).
    """
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = x * g  # correlation weights of d/dx (the derivative kernel flipped)
    d1 = d1 / (x * d1).sum()
    d2 = (x**2 / sigma**4 - 1.0 / sigma**2) * g
    d2 = d2 - g * d2.sum()  # zero response to a constant
    d2 = 2.0 * d2 / (x**2 * d2).sum()  # response 2 to x**2, i.e. d2/dx2 exact on quadratics
    return torch.stack([g, d1, d2]).float()


class ClassicalFeaturizer(Backbone):
    """Weight-free multi-scale features, same contract as a ViT backbone.

    For each crop (at its own resolution, scales in crop voxels) and each ``sigma`` in
    :data:`CLASSICAL_SIGMAS_VOX`: Gaussian-smoothed intensity, scale-normalised gradient magnitude
    ``sigma * |grad L|``, the scale-normalised Hessian eigenvalues ``sigma**2 * lambda_{1,2}`` sorted by
    magnitude (``|l1| <= |l2|``) and a bright-tube response ``max(-l2, 0) * exp(-(l1 / l2)**2 / (2 beta**2))``
    (Frangi et al., MICCAI 1998, 2D blobness term; ``beta = 0.5``; linear in contrast, so no image-dependent
    ``c`` constant is needed). Plus the raw intensity: ``1 + 5 * len(sigmas)`` channels. Derivatives are
    separable convolutions with sampled Gaussian-derivative kernels (edge-replicate padding), so it batches
    and runs on GPU. Maps are average-pooled to ``spec.res x spec.res`` (adaptive pooling) and finally
    standardised per channel (see ``standardize``). Everything is a function of the crop alone.

    Parameters
    ----------
    spec : BackboneSpec
        The ``classical`` spec; ``spec.res`` is the output grid side.
    standardize : {"crop", "fixed"}
        ``"crop"`` (default): z-score each channel over the grid of each crop (instance normalisation).
        ``"fixed"``: divide each channel by a constant typical scale (absolute values kept across crops). On
        synthetic tube crops, spherical 2-means on the tokens matched the tube tokens with Dice 0.57 for
        ``"crop"`` against 0.29 for ``"fixed"`` (the intensity channels dominate the cosine there).
    beta : float
        Tube-versus-blob sensitivity of the vesselness response.
    """

    def __init__(self, spec: BackboneSpec, *, standardize: str = "crop", beta: float = 0.5) -> None:
        super().__init__(spec, weights_id="none")
        if standardize not in ("fixed", "crop"):
            raise ValueError(f"standardize={standardize!r}; expected 'fixed' or 'crop'")
        self.standardize = standardize
        self.beta = float(beta)
        self.sigmas_vox = CLASSICAL_SIGMAS_VOX
        for i, s in enumerate(self.sigmas_vox):
            g, d1, d2 = k = gaussian_derivative_kernels(s)
            zero = torch.zeros_like(g)
            # One pass down the rows (smooth, d/dy, d2/dy2), then one grouped pass along the columns: from the
            # smoothed rows (g, d/dx, d2/dx2), from d/dy (g, d/dx), from d2/dy2 (g); zero kernels pad the groups.
            self.register_buffer(f"_ky{i}", k.view(3, 1, -1, 1), persistent=False)
            self.register_buffer(f"_kx{i}", torch.stack([g, d1, d2, g, d1, zero, g, zero, zero]).view(9, 1, 1, -1),
                                 persistent=False)
        names = ["intensity"]
        for s in self.sigmas_vox:
            names += [f"{k}_s{s:g}" for k in ("smooth", "gradmag", "hess_l1", "hess_l2", "vesselness")]
        self.channel_names: tuple[str, ...] = tuple(names)
        # Typical magnitudes on [0, 1] crops (intensity-like ~0.5, derivatives ~0.1), used by "fixed".
        scale = [0.5] + [v for _ in self.sigmas_vox for v in (0.5, 0.1, 0.05, 0.1, 0.1)]
        self.register_buffer("_scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)
        self.weights_id = f"none:classical:standardize={standardize}:beta={self.beta:g}"
        self._freeze()

    def _derivatives(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
        """``(L, Lx, Ly, Lxx, Lyy, Lxy)`` at scale ``sigmas_vox[i]``: two separable convolution calls (rows,
        then grouped columns) instead of one call per derivative and direction (4x faster on a CPU, same
        values)."""
        ky, kx = getattr(self, f"_ky{i}"), getattr(self, f"_kx{i}")
        r = ky.shape[2] // 2
        rows = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky)  # (B, 3, P, P): g, d1, d2 along y
        o = F.conv2d(F.pad(rows, (r, r, 0, 0), mode="replicate"), kx, groups=3)
        return o[:, 0:1], o[:, 1:2], o[:, 3:4], o[:, 2:3], o[:, 6:7], o[:, 4:5]

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Classical features of crops.

        Parameters
        ----------
        crops : (B, 1, P, P) float tensor
            Preprocessed crops in [0, 1].

        Returns
        -------
        features : (B, 1 + 5 * n_sigmas, res, res) float32 tensor
            Channels in the order of :attr:`channel_names`.
        """
        self._check_crops(crops)
        with torch.no_grad():
            x = to_model_input(crops, self.spec)
            chans = [x]
            for i, s in enumerate(self.sigmas_vox):
                smooth, lx, ly, lxx, lyy, lxy = self._derivatives(x, i)  # last dim is x (columns)
                gradmag = s * torch.sqrt(lx**2 + ly**2 + 1e-12)
                half_tr = 0.5 * (lxx + lyy) * s**2
                rad = torch.sqrt((0.5 * (lxx - lyy)) ** 2 + lxy**2 + 1e-12) * s**2
                ea, eb = half_tr + rad, half_tr - rad
                swap = ea.abs() > eb.abs()
                l1, l2 = torch.where(swap, eb, ea), torch.where(swap, ea, eb)  # |l1| <= |l2|
                rb = l1 / torch.where(l2.abs() < 1e-8, torch.full_like(l2, 1e-8), l2)
                vessel = torch.relu(-l2) * torch.exp(-(rb**2) / (2.0 * self.beta**2))
                chans += [smooth, gradmag, l1, l2, vessel]
            f = torch.cat(chans, dim=1)
            f = F.adaptive_avg_pool2d(f, (self.spec.res, self.spec.res))
            if self.standardize == "fixed":
                return f / self._scale
            mean = f.mean(dim=(2, 3), keepdim=True)
            std = f.std(dim=(2, 3), keepdim=True, unbiased=False)
            return (f - mean) / (std + 1e-6)
