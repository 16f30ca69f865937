"""Optional dense-CRF refinement of per-slice vessel probabilities (``pip install stego-vessels[crf]``).

A fully connected CRF (Krähenbühl & Koltun 2011, via ``pydensecrf2``) with the seed's settings: 10 mean-field
iterations, a Gaussian kernel (sxy 1, compat 3) and a bilateral kernel on the 8-bit image (sxy 67, srgb 3,
compat 4). :func:`stego_core.engine.postprocess.crf_refine` applies it slice by slice as the ``crf`` post-processing
step of any method (``crf=true`` or ``postprocess: [{step: crf}]``).

Named settings (:data:`CRF_PRESETS`, ``{step: crf, preset: thin}``): ``seed`` is the above, built for wide
regions; on STEGO's thin, precise vessel probabilities its strong Potts terms (a 67-pixel bilateral reach, Gaussian
compatibility 3) outvote the weak unaries of one-to-three-pixel vessels and erase them. ``thin`` keeps them:
a bilateral kernel that reaches about a vessel's width (sxy 3, compatibility 2: pixels of a vessel's own
intensity along it vote for each other, the darker background beside it hardly) and an almost silent Gaussian
smoothness term (compatibility 0.1 instead of 3), so that the CRF cleans along intensity edges without voting
a thin structure away (``benchmarks/RESULTS.md``, offline STEGO ablation: the phantom's held-out Dice).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from stego_core._checks import check_ndim, check_range, check_same_shape


@dataclass(frozen=True)
class CRFSettings:
    """Dense-CRF parameters (the seed's values by default)."""

    n_iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def __post_init__(self) -> None:
        check_range(self.n_iterations, "crf.n_iterations", 1)
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            check_range(getattr(self, name), f"crf.{name}", 0.0, low_inclusive=False)


#: Named CRF settings (see the module docstring): ``seed`` (the seed's, for wide regions) and ``thin`` (keeps
#: one-to-three-pixel vessels). Read-only.
CRF_PRESETS = MappingProxyType({
    "seed": CRFSettings(),
    "thin": CRFSettings(gaussian_sxy=1.0, gaussian_compat=0.1, bilateral_sxy=3.0, bilateral_srgb=3.0,
                        bilateral_compat=2.0),
})


def crf_preset(name: str) -> CRFSettings:
    """The settings of a named preset of :data:`CRF_PRESETS`.

    Parameters
    ----------
    name : str
        ``seed`` or ``thin``.

    Returns
    -------
    CRFSettings
    """
    if name not in CRF_PRESETS:
        raise ValueError(f"unknown CRF preset {name!r}; expected one of {tuple(CRF_PRESETS)}")
    return CRF_PRESETS[name]


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ImportError("dense-CRF refinement needs pydensecrf2: pip install 'stego-vessels[crf]' "
                          "(or pip install pydensecrf2)") from exc
    return dcrf, unary_from_softmax


def refine_slice(image: np.ndarray, prob: np.ndarray, settings: CRFSettings = CRFSettings()) -> np.ndarray:
    """Refine the vessel probability of one 2D slice with a dense CRF.

    Parameters
    ----------
    image : (H, W) float ndarray in [0, 1]
        The preprocessed slice (the bilateral kernel compares its 8-bit intensities).
    prob : (H, W) float ndarray in [0, 1]
        Vessel probability to refine.

    Returns
    -------
    (H, W) float32 ndarray in [0, 1]
        The CRF's marginal vessel probability.
    """
    check_ndim(image, 2, "image")
    check_same_shape(image, prob, "image", "prob")
    dcrf, unary_from_softmax = _densecrf()
    h, w = prob.shape
    p = np.clip(prob.astype(np.float32), 1e-5, 1 - 1e-5)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - p, p]))))
    crf.addPairwiseGaussian(sxy=settings.gaussian_sxy, compat=settings.gaussian_compat)
    grey = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    crf.addPairwiseBilateral(sxy=settings.bilateral_sxy, srgb=settings.bilateral_srgb, rgbim=rgb,
                             compat=settings.bilateral_compat)
    q = np.asarray(crf.inference(settings.n_iterations), dtype=np.float32)
    return q[1].reshape(h, w)
