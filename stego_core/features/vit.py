"""timm vision transformers as frozen backbones, and their weights: files, the Hugging Face hub, DINO releases.

DINO / DINOv2 ViTs from timm (STEGO's backbone, Hamilton et al., ICLR 2022) and the in-domain ViTs that
``pretrain`` trains. Features are the last block's patch tokens after the final norm, prefix (CLS) tokens
dropped, reshaped to ``(B, C, res / p, res / p)``.

Weights come from exactly one place, chosen by :func:`build_vit`'s ``weights`` argument: the Hugging Face hub
(``"hub"``; fails fast offline with instructions), a local file (timm state dict, ``.safetensors`` or the
original DINO release ``.pth``, read by :func:`load_weights_file`) or ``"random"`` (explicit, for tests). There
is never a silent fallback to random weights. A ``.safetensors`` file written by ``pretrain`` records its spec
(patch size, width) in its metadata, and a file for another backbone is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from stego_core.features.base import Backbone, BackboneSpec, to_model_input

__all__ = [
    "DEFAULT_WEIGHTS_CACHE",
    "WEIGHTS_ARTIFACT",
    "WEIGHTS_CACHE_ENV",
    "ViTBackbone",
    "build_vit",
    "create_vit",
    "load_weights_file",
]

logger = logging.getLogger(__name__)

_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_HUB_PROBE_TIMEOUT_S = 3.0
#: Where a pretraining run keeps its teacher backbone (``runs:/<id>`` without a path means this artifact).
WEIGHTS_ARTIFACT = "backbone/teacher_backbone.safetensors"
#: Environment variable naming the folder that ``runs:/`` weights are downloaded into.
WEIGHTS_CACHE_ENV = "STEGO_WEIGHTS_CACHE"
#: Its default, relative to the working directory like the default tracking store ``sqlite:///mlflow.db``.
DEFAULT_WEIGHTS_CACHE = "outputs/weights_cache"


class ViTBackbone(Backbone):
    """A timm ViT (DINO / DINOv2) as a frozen backbone; build it with :func:`build_backbone`.

    Parameters
    ----------
    spec : BackboneSpec
        Its spec (``kind == "vit"``).
    model : timm VisionTransformer
        Built with ``img_size=spec.res, num_classes=0``, weights already loaded.
    weights_id : str
        See :class:`Backbone`.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str) -> None:
        super().__init__(spec, weights_id)
        self.model = model
        self._freeze()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Features of crops.

        Parameters
        ----------
        crops : (B, 1, P, P) float tensor
            Preprocessed crops in [0, 1].

        Returns
        -------
        features : (B, C, res / p, res / p) float tensor
            Last-block patch tokens after the final norm; prefix (CLS) tokens dropped.
        """
        self._check_crops(crops)
        with torch.no_grad():
            x = to_model_input(crops, self.spec)
            tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), final norm applied
            tokens = tokens[:, self.model.num_prefix_tokens:]
            b, n, c = tokens.shape
            g = self.spec.grid
            if n != g * g:
                raise RuntimeError(f"{self.spec.name}: expected {g * g} patch tokens, got {n}")
            return tokens.transpose(1, 2).reshape(b, c, g, g)


def create_vit(spec: BackboneSpec, *, seed: int = 0, dynamic_img_size: bool = False) -> nn.Module:
    """The bare timm ViT of ``spec`` (random init with ``seed``; the global RNG is left untouched).

    ``dynamic_img_size=True`` lets inputs of other sizes through (DINO's local views); the state dict is the
    same either way.
    """
    import timm

    if spec.kind != "vit" or spec.timm_name is None:
        raise ValueError(f"backbone {spec.name!r} is not a ViT")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(spec.timm_name, pretrained=False, img_size=spec.res, num_classes=0,
                                 dynamic_img_size=dynamic_img_size, **dict(spec.timm_kwargs))


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint, preferring DINO's ``teacher``; strip wrapper prefixes."""
    sd = obj
    for _ in range(4):  # nested wrappers, e.g. {"state_dict": {"model": {...}}}
        if not isinstance(sd, Mapping):
            break
        wrapper = next((k for k in ("teacher", "state_dict", "model", "module", "student")
                        if isinstance(sd.get(k), Mapping)), None)
        if wrapper is None:
            break
        logger.info("weights %s: using the %r entry of the checkpoint", path.name, wrapper)
        sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"weights file {path} does not hold a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone."):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    if not out:
        raise ValueError(f"weights file {path} holds no tensors")
    return out


def _sha256(path: Path, n_hex: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n_hex]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO full checkpoints keep their args
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(exc).__name__
        raise ValueError(f"{path} is not a weights file: expected a .safetensors file, a torch state dict "
                         f"(.pth / .pt / .bin) or a DINO release checkpoint, but reading it failed ({reason})"
                         ) from None
    return _unwrap_state_dict(obj, path)


def _check_safetensors_spec(path: Path, model: nn.Module, backbone_name: str) -> None:
    """Refuse a ``.safetensors`` file whose recorded spec (written by ``pretrain``) names another patch/width."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    meta = {**meta, "vit_patch": meta.get("vit_patch", meta.get("patch_size"))}  # files written before the rename
    if meta["vit_patch"] is None:
        return
    patch = model.patch_embed.proj.kernel_size[0]
    dim = model.patch_embed.proj.out_channels
    if int(meta["vit_patch"]) != patch or int(meta.get("embed_dim", dim)) != dim:
        raise ValueError(f"weights file {path} holds backbone {meta.get('backbone', '?')!r} (patch "
                         f"{meta['vit_patch']}, dim {meta.get('embed_dim')}) but backbone {backbone_name!r} has "
                         f"patch {patch}, dim {dim}; use model.backbone={meta.get('backbone', '?')}")


def load_weights_file(model: nn.Module, path: str | Path, *, backbone_name: str = "?") -> None:
    """Load a local weights file into a timm ViT, checking that it fits.

    Accepts a timm state dict (``.pth``/``.pt``/``.bin``), a ``.safetensors`` file or an original DINO /
    DINOv2 release ``.pth`` (possibly wrapped in ``teacher``/``student``/``state_dict``/``model`` with
    ``module.``/``backbone.`` prefixes, which are stripped). ``head.*`` keys are ignored; ``pos_embed`` is
    resampled (timm's ``resample_abs_pos_embed``) when the model's ``res`` differs from the file's. Logs the
    source and unexpected keys.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is unreadable, misses model keys, or a tensor's shape does not fit (e.g. another
        architecture or patch size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for backbone {backbone_name!r} does not exist")
    sd = _read_tensors(path)
    if path.suffix == ".safetensors":
        _check_safetensors_spec(path, model, backbone_name)
        sd = _unwrap_state_dict(sd, path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    model_sd = model.state_dict()
    # Refuse a different patch size up front: timm's filter would silently resample the patch embedding.
    pe = sd.get("patch_embed.proj.weight")
    if pe is not None and tuple(pe.shape) != tuple(model_sd["patch_embed.proj.weight"].shape):
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: patch_embed.proj.weight "
                         f"has shape {tuple(pe.shape)}, the model expects "
                         f"{tuple(model_sd['patch_embed.proj.weight'].shape)} (another patch size or width?)")
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: {exc}") from exc
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
                  for k, v in sd.items() if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    missing = [k for k in model_sd if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in model_sd]
    if bad_shapes or missing:
        parts = []
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches ({'; '.join(bad_shapes[:4])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: {' and '.join(parts)}")
    model.load_state_dict(sd, strict=False)
    if unexpected:
        logger.warning("weights %s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected[:10])
    logger.info("backbone %s: loaded weights from %s (%d tensors, missing keys: none)", backbone_name, path,
                len(sd))


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    import huggingface_hub.constants as hf_constants

    return (_truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
            or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False)))


def _hub_reachable(endpoint: str, timeout_s: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout_s`` (DNS included)."""
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            pass

    # A daemon thread bounds the wait, DNS resolution included, and never blocks interpreter exit.
    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result)


def _resolve_hub_file(spec: BackboneSpec, hf_hub_id: str) -> Path:
    """Path of the hub weights file: from the local HF cache, else downloaded; fails fast offline."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    for filename in _HUB_FILENAMES:
        cached = huggingface_hub.try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(cached, str) and Path(cached).is_file():
            logger.info("backbone %s: hub weights %s/%s found in the local cache", spec.name, hf_hub_id, filename)
            return Path(cached)
    example = Path(urllib.parse.urlparse(spec.weights_url or "").path).name or "weights.pth"
    how = (f"Pass a local weights file instead: build_backbone({spec.name!r}, weights='/path/to/{example}') "
           f"(the original release is {spec.weights_url}; a timm state dict or .safetensors file from "
           f"hub repo {hf_hub_id} also works), or weights='random' for tests only.")
    if _hub_offline():
        raise RuntimeError(f"pretrained weights for backbone {spec.name!r} (hub repo {hf_hub_id}) are not in the "
                           f"local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    endpoint = getattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    if not _hub_reachable(endpoint):
        raise RuntimeError(f"pretrained weights for backbone {spec.name!r} (hub repo {hf_hub_id}) are not in the "
                           f"local Hugging Face cache and {endpoint} is unreachable (offline?). {how}")
    try:
        return Path(huggingface_hub.hf_hub_download(hf_hub_id, _HUB_FILENAMES[0]))
    except Exception as exc:  # noqa: BLE001 - re-raised with instructions
        raise RuntimeError(f"downloading weights for backbone {spec.name!r} from hub repo {hf_hub_id} failed "
                           f"({type(exc).__name__}: {exc}). {how}") from exc




def build_vit(spec: BackboneSpec, *, weights: str | Path = "hub", seed: int = 0) -> ViTBackbone:
    """The frozen ViT of ``spec`` with its weights (see :func:`stego_core.features.backbones.build_backbone`).

    Raises
    ------
    ValueError
        A ``runs:/`` URI (the platform turns it into a file first) or a weights file that does not fit.
    FileNotFoundError
        A weights path that does not exist.
    RuntimeError
        ``weights="hub"`` for an in-domain ViT, or hub weights neither cached nor downloadable.
    """
    if isinstance(weights, str) and weights.startswith("runs:/"):
        raise ValueError(f"model.weights={weights!r}: a run's weights are fetched by the platform first "
                         "(stego_core.platform.weights.fetch_weights), then given here as a file")
    model = create_vit(spec, seed=seed)
    if isinstance(weights, str) and weights == "hub" and spec.trainable:
        raise RuntimeError(f"backbone {spec.name!r} is an in-domain ViT without published weights: pretrain it "
                           f"(`mlflow run . -e pretrain -P backbone={spec.name}`) and pass "
                           f"model.weights=runs:/<pretrain run id> or model.weights=/path/to/teacher_backbone."
                           f"safetensors (weights='random' for the untrained control)")
    if isinstance(weights, str) and weights == "random":
        logger.warning("backbone %s: RANDOM weights (seed %d), as explicitly requested", spec.name, seed)
        weights_id = f"random:seed={seed}"
    elif isinstance(weights, str) and weights == "hub":
        hf_hub_id = model.pretrained_cfg.get("hf_hub_id") or f"timm/{spec.timm_name}"
        path = _resolve_hub_file(spec, hf_hub_id)
        logger.info("backbone %s: weights source hub %s (%s)", spec.name, hf_hub_id, path)
        load_weights_file(model, path, backbone_name=spec.name)
        weights_id = f"hub:{hf_hub_id}/{path.name}:sha256={_sha256(path)}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} for backbone {spec.name!r} is neither 'hub', "
                                    f"'random' nor an existing file")
        logger.info("backbone %s: weights source file %s", spec.name, path)
        load_weights_file(model, path, backbone_name=spec.name)
        weights_id = f"file:{path.name}:sha256={_sha256(path)}"
    return ViTBackbone(spec, model, weights_id)
