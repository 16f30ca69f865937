"""``synth``: a 3D U-Net trained only on domain-randomized synthetic volumes (:mod:`stego_core.data.synth`),
applied zero-shot to any volume (issue 31).

No real image or label was used to train the shipped weights (``weights/synth_vessels.pt``, provenance in
``weights/synth_vessels.json``); they are read from the installed package, offline. Per volume:

1. intensity: robust percentile normalisation (:func:`stego_core.data.synth.robust_normalize`, the 0.5th and
   99.9th percentiles of the brain-mask voxels to 0 and 1, clipped), the same function every training patch ends
   with; ``normalize: window`` additionally renormalises each window by its own percentiles;
2. spacing: when the header gives a physical voxel size and the z step is more than ``max_anisotropy`` times the
   in-plane step, z is upsampled (linear) to ``target_anisotropy`` (inside the generator's 1-3 range). In-plane
   the grid is used as it is (the generator is scale-free: radii from sub-voxel to 16 voxels); an unknown
   spacing (header unit "unknown") is used as it is, i.e. treated as isotropic;
3. MONAI ``sliding_window_inference`` (Gaussian blending, ``patch_size`` and ``overlap``; the z window shrinks to
   the depth of a shallow stack, rounded up to a multiple of 8);
4. back to the original grid (trilinear), 0 outside the brain mask, cut at ``threshold`` (fixed a priori).

``fit`` learns nothing (the model is pretrained); ``settings.model_uri`` loads a network logged by
``pretrain_synth`` (or by any run of this method) instead of the shipped one, ``settings.weights`` a ``.pt`` file
written by :func:`save_weights`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from stego_core._checks import check_choice, check_range
from stego_core.methods.registry import BuildContext, MethodEntry, Result

__all__ = ["NetworkSettings", "SynthMethodSettings", "SynthMethod", "SYNTH", "build_network", "save_weights",
           "load_weights", "shipped_weights", "shipped_provenance", "predict_probability", "z_zoom"]

#: File names of the shipped weights and their provenance, inside ``stego_core/methods/weights/``.
SHIPPED_WEIGHTS = "synth_vessels.pt"
SHIPPED_PROVENANCE = "synth_vessels.json"


@dataclass(frozen=True)
class NetworkSettings:
    """The MONAI ``UNet`` of :func:`build_network` (3D, one input channel, one logit channel).

    Attributes
    ----------
    channels : tuple of int
        Feature channels per level (stride 2 between levels).
    res_units : int
        Residual units per level.
    norm : {"BATCH", "INSTANCE"}
        Normalisation layer. Batch norm: instance norm stretched every window's contrast and made noise in air
        look like structure (docs/synth.md).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    res_units: int = 1
    norm: str = "BATCH"

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"network.channels={self.channels!r} must be at least two positive sizes")
        check_range(self.res_units, "network.res_units", 0, 8)
        check_choice(self.norm, "network.norm", ("BATCH", "INSTANCE"))


def build_network(net: NetworkSettings = NetworkSettings(), *, seed: int | None = None) -> Any:
    """A fresh MONAI 3D ``UNet`` (PReLU) with ``net``'s shape; ``seed`` seeds its initial weights."""
    import torch
    from monai.networks.nets import UNet

    if seed is not None:
        torch.manual_seed(int(seed))
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(net.channels),
                strides=(2,) * (len(net.channels) - 1), num_res_units=int(net.res_units), norm=net.norm,
                act="PRELU")


def save_weights(model: Any, path: str | Path, net: NetworkSettings, *, extra: dict | None = None) -> Path:
    """Write ``{"network": <NetworkSettings as a dict>, "state_dict": ..., **extra}`` with ``torch.save``: a file
    :func:`load_weights` (and ``synth``'s ``settings.weights``) rebuilds the network from, alone."""
    import dataclasses

    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"network": dataclasses.asdict(net), "state_dict": {k: v.detach().cpu()
                                                                  for k, v in model.state_dict().items()}}
    torch.save({**payload, **(extra or {})}, path)
    return path


def shipped_weights() -> Path:
    """Path of the weights shipped in the package (``stego_core/methods/weights/synth_vessels.pt``)."""
    return Path(str(resources.files("stego_core.methods") / "weights" / SHIPPED_WEIGHTS))


def shipped_provenance() -> dict[str, Any]:
    """The shipped weights' provenance (generator settings, steps, seed, commit, zero-shot table), parsed."""
    path = Path(str(resources.files("stego_core.methods") / "weights" / SHIPPED_PROVENANCE))
    return json.loads(path.read_text())


def load_weights(path: str | Path) -> tuple[Any, NetworkSettings]:
    """The network saved at ``path`` by :func:`save_weights`, in eval mode, on the CPU.

    Raises
    ------
    ValueError
        One line naming the file: missing, unreadable, or not a ``synth`` weights file.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"settings.weights={str(path)!r}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"settings.weights={str(path)!r}: not a torch file ({type(exc).__name__}: {first})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "network" not in payload:
        raise ValueError(f"settings.weights={str(path)!r}: not a synth weights file (no 'network' and "
                         "'state_dict'; write it with stego_core.methods.synth.save_weights)")
    net_dict = dict(payload["network"])
    net = NetworkSettings(channels=tuple(int(c) for c in net_dict["channels"]), res_units=int(net_dict["res_units"]),
                          norm=str(net_dict["norm"]))
    model = build_network(net)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"settings.weights={str(path)!r}: weights do not fit the network {net}: {first}") from None
    model.eval()
    return model, net


@dataclass(frozen=True)
class SynthMethodSettings:
    """Settings of the ``synth`` method (zero-shot inference of a synthetic-trained 3D U-Net).

    Attributes
    ----------
    weights : str
        A ``.pt`` file of :func:`save_weights` (a ``pretrain_synth`` checkpoint); empty: the shipped weights.
    model_uri : str
        A network logged by ``pretrain_synth`` or by a run of this method (``runs:/<id>/model``, a run id);
        takes precedence over ``weights``.
    patch_size : tuple of 3 int
        Sliding-window size in voxels (the training patches were 64^3; multiples of 8).
    overlap : float
        Overlap of neighbouring windows, in [0, 1).
    batch_size : int
        Windows per forward pass.
    threshold : float
        Probabilities above it are vessel (fixed a priori, 0.5).
    normalize : {"volume", "window"}
        ``volume``: robust percentiles of the brain-mask voxels of the whole volume; ``window``: additionally each
        window renormalised by its own percentiles, as each training patch was.
    low_percentile, high_percentile : float
        Percentiles mapped to 0 and 1.
    max_anisotropy, target_anisotropy : float
        With a known physical spacing, z is upsampled to ``target_anisotropy`` when z / in-plane exceeds
        ``max_anisotropy`` (0 disables resampling).
    """

    weights: str = ""
    model_uri: str = ""
    patch_size: tuple[int, int, int] = (64, 64, 64)
    overlap: float = 0.25
    batch_size: int = 2
    threshold: float = 0.5
    normalize: str = "volume"
    low_percentile: float = 0.5
    high_percentile: float = 99.9
    max_anisotropy: float = 3.0
    target_anisotropy: float = 2.0

    def __post_init__(self) -> None:
        if len(self.patch_size) != 3 or any(int(p) != p or p < 8 or p % 8 for p in self.patch_size):
            raise ValueError(f"settings.patch_size={self.patch_size!r} must be three multiples of 8 (>= 8)")
        check_range(self.overlap, "settings.overlap", 0.0, 1.0, high_inclusive=False)
        check_range(self.batch_size, "settings.batch_size", 1)
        check_range(self.threshold, "settings.threshold", 0.0, 1.0)
        check_choice(self.normalize, "settings.normalize", ("volume", "window"))
        check_range(self.low_percentile, "settings.low_percentile", 0.0, 100.0)
        check_range(self.high_percentile, "settings.high_percentile", 0.0, 100.0)
        if not self.low_percentile < self.high_percentile:
            raise ValueError(f"settings.low_percentile={self.low_percentile} must be below "
                             f"settings.high_percentile={self.high_percentile}")
        check_range(self.max_anisotropy, "settings.max_anisotropy", 0.0)
        check_range(self.target_anisotropy, "settings.target_anisotropy", 1.0)


def z_zoom(spacing: Sequence[float] | None, max_anisotropy: float = 3.0, target_anisotropy: float = 2.0) -> float:
    """Factor by which z is upsampled before inference (1.0: none).

    Parameters
    ----------
    spacing : (3,) sequence of float or None
        Physical voxel size (any unit); None when unknown (the grid is then taken as it is).
    max_anisotropy, target_anisotropy : float
        z is resampled to ``target_anisotropy`` only when z / in-plane exceeds ``max_anisotropy`` (0: never).

    Examples
    --------
    >>> z_zoom((0.994, 0.994, 5.0))  # two-photon: 5 um slices of 1 um pixels
    2.515...
    >>> z_zoom(None), z_zoom((0.5, 0.5, 0.8))
    (1.0, 1.0)
    """
    if spacing is None or max_anisotropy <= 0:
        return 1.0
    ratio = float(spacing[2]) / (0.5 * (float(spacing[0]) + float(spacing[1])))
    return ratio / target_anisotropy if ratio > max_anisotropy else 1.0


def _resize(vol: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import torch

    t = torch.as_tensor(np.ascontiguousarray(vol), dtype=torch.float32)[None, None]
    return torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def _per_window(x: Any, low: float, high: float) -> Any:
    """Each (B, 1, ...) window mapped by its own ``low`` / ``high`` percentiles (fractions) to [0, 1]."""
    import torch

    flat = x.reshape(x.shape[0], -1)
    q = torch.quantile(flat, torch.tensor([low, high], dtype=flat.dtype, device=flat.device), dim=1)
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo, hi = q[0].view(shape), q[1].view(shape)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)


def predict_probability(model: Any, image: np.ndarray, settings: SynthMethodSettings = SynthMethodSettings(), *,
                        brain_mask: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                        device: str = "cpu") -> np.ndarray:
    """Zero-shot vessel probability of a whole volume.

    Parameters
    ----------
    model : torch.nn.Module
        A network of :func:`build_network` (logits out).
    image : (I, J, K) ndarray
        Intensities, any range (K: the slice axis).
    settings : SynthMethodSettings
        Window, overlap, normalisation and resampling.
    brain_mask : (I, J, K) bool ndarray, optional
        Percentiles are taken over it; the probability is 0 outside it.
    spacing : (3,) sequence of float, optional
        Physical voxel size; None: unknown, no resampling.
    device : str
        Torch device of the forward passes.

    Returns
    -------
    (I, J, K) float32 ndarray in [0, 1]
    """
    import torch
    from monai.inferers import sliding_window_inference

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D (I, J, K), got shape {image.shape}")
    mask = None if brain_mask is None else np.asarray(brain_mask, dtype=bool)
    ref = image[mask] if mask is not None and mask.any() else image
    a, b = np.percentile(ref, [settings.low_percentile, settings.high_percentile])
    x = np.clip((image - a) / max(float(b - a), 1e-6), 0.0, 1.0).astype(np.float32)
    shape0 = x.shape
    f = z_zoom(spacing, settings.max_anisotropy, settings.target_anisotropy)
    if f > 1.0:
        x = _resize(x, (shape0[0], shape0[1], int(round(shape0[2] * f))))
    roi = tuple(min(int(p), 8 * math.ceil(n / 8)) for p, n in zip(settings.patch_size, x.shape))
    lo, hi = settings.low_percentile / 100.0, settings.high_percentile / 100.0
    window = settings.normalize == "window"
    model.eval()
    model.to(device)

    def net(w: Any) -> Any:
        return model(_per_window(w, lo, hi) if window else w)

    with torch.no_grad():
        logits = sliding_window_inference(torch.as_tensor(x, device=device)[None, None], roi, settings.batch_size,
                                          net, overlap=settings.overlap, mode="gaussian")
        prob = torch.sigmoid(logits)[0, 0].float().cpu().numpy()
    if prob.shape != shape0:
        prob = _resize(prob, shape0)
    prob = np.clip(prob, 0.0, 1.0).astype(np.float32)
    if mask is not None:
        prob[~mask] = 0.0
    return prob


class SynthMethod:
    """The registry's ``synth``: a pretrained network, nothing to fit, predictions by MONAI's sliding window."""

    name = "synth"

    def __init__(self, settings: SynthMethodSettings, context: BuildContext) -> None:
        self._settings = settings
        self.threshold = float(settings.threshold)
        self._device = _device(context.device)
        self.model: Any = None
        self.network: NetworkSettings | None = None
        if not settings.model_uri:  # a model_uri's network arrives through load_state
            self.model, self.network = load_weights(settings.weights or shipped_weights())

    def fit(self, cases: Sequence[Any], validation: Sequence[Any] = ()) -> None:
        """Nothing to learn: the network was trained on synthetic volumes only (``pretrain_synth``)."""

    def predict(self, case: Any) -> Result:
        if self.model is None:
            raise ValueError("synth: no network (settings.model_uri was not loaded)")
        spacing = case.spacing_mm
        prob = predict_probability(self.model, case.image, self._settings, brain_mask=case.brain_mask,
                                   spacing=spacing, device=self._device)
        return Result(prob)

    def settings(self) -> SynthMethodSettings:
        return self._settings

    def state(self) -> Any:
        return self.model

    def load_state(self, state: Any) -> None:
        self.model = state
        self.model.eval()


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


SYNTH = MethodEntry("synth", "learned", SynthMethod, settings=SynthMethodSettings,
                    summary="3D U-Net trained on domain-randomized synthetic volumes only, zero-shot (shipped weights)")
