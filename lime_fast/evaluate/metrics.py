"""The metrics of MagicBrush's evaluation, computed as its official script does.

Reference: ``evaluation/image_eval.py`` of OSU-NLP-Group/MagicBrush (the script behind MagicBrush's
tables and the LIME paper's Table 1). Per pair (generated picture, ground-truth target):

* **L1, L2** (``eval_distance``): the generated picture is resized to the target's size with PIL's
  default filter (bicubic for RGB), both become [0, 1] float tensors (``ToTensor``), and the metric is
  ``nn.L1Loss`` / ``nn.MSELoss``: the mean over channels and pixels.
* **CLIP-I** (``eval_clip_i``): cosine similarity of the CLIP ViT-B/32 image embeddings of the two
  pictures, each preprocessed as ``clip.load``'s transform: bicubic resize of the short side to 224,
  center crop 224, [0, 1], normalized with CLIP's mean and std.
* **DINO** (``eval_clip_i(metric='dino')``): cosine similarity of DINO ViT-S/16's class-token outputs
  (``dino_vits16``; ``ViTModel``'s ``last_hidden_state[:, 0]``, after its final layer norm, is the
  same vector), preprocessed as ``Resize(256, bicubic)``, ``CenterCrop(224)``, ImageNet mean and std.
* **CLIP-T** (``eval_clip_t``): cosine similarity of the generated picture's CLIP image embedding and
  the CLIP text embedding of the target's caption; the same with the target picture instead is the
  "oracle" CLIP-T the script also reports.

Each metric is averaged with equal weight over the pairs of a setting (``eval_distance`` and
friends: sum / len(pairs)): single-turn = every turn of every session, each edited from the
ground-truth input ("all_turn"); multi-turn = one pair per session, its final generated turn (each turn
edited from the previous generated one) against its final target ("final_turn").

Differences, all below the printed precision: the script computes L1/L2 in float32 and CLIP on the
GPU in float16 (``clip.load`` on CUDA); here pixels are float64 and the embedding models run in the
dtype they load in (float32 by default). The embedding models load with transformers from local
folders (``openai/clip-vit-base-patch32`` and ``facebook/dino-vits16`` layouts); a folder that lacks any
of the model's weights (a CLIP text model alone, a truncated file) is refused, naming what is missing,
rather than run with random weights in their place. CLIPModel's
``visual_projection(vision_model(x).pooler_output)`` is OpenAI CLIP's ``encode_image`` and
``text_projection(text_model(ids).pooler_output)`` its ``encode_text`` (the end-of-text token's
features; the tokens after it cannot change them, so padding does not matter).

Beyond the script (lime_fast's own, reported separately): L1 inside and outside the dataset's edit
mask, and the IoU of a method's RoI with that mask.
"""

from __future__ import annotations

from ..errors import LimeError
import math
from pathlib import Path

import numpy as np
import PIL.Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's preprocessing (clip/clip.py, _transform)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the DINO transform in image_eval.py
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_rgb(img) -> PIL.Image.Image:
    """A path or PIL image -> RGB PIL image (``Image.open(...).convert('RGB')``, as the script reads)."""
    if isinstance(img, (str, Path)):
        with PIL.Image.open(img) as f:
            return f.convert("RGB")
    return img.convert("RGB")


def to_unit(img: PIL.Image.Image) -> np.ndarray:
    """RGB PIL -> float64 [H, W, 3] in [0, 1] (torchvision's ToTensor, channels last)."""
    return np.asarray(img, dtype=np.float64) / 255.0


def pixel_metrics(generated, target, mask: np.ndarray | None = None) -> dict[str, float]:
    """L1 and L2 of ``generated`` against ``target`` (paths or PIL), as image_eval.py's eval_distance:
    the generated picture is resized (bicubic) to the target's size first.

    With ``mask`` (bool [H, W], any size: resized nearest to the target's), also ``l1_in`` / ``l1_out``:
    the mean absolute error over the pixels inside / outside it (NaN where there are none).
    """
    gen, tgt = load_rgb(generated), load_rgb(target)
    if gen.size != tgt.size:
        gen = gen.resize(tgt.size, PIL.Image.BICUBIC)  # PIL's default for RGB, which the script relies on
    err = np.abs(to_unit(gen) - to_unit(tgt))
    out = {"l1": float(err.mean()), "l2": float((err**2).mean())}
    if mask is not None:
        m = resize_mask(mask, tgt.size)
        out["l1_in"] = float(err[m].mean()) if m.any() else math.nan
        out["l1_out"] = float(err[~m].mean()) if (~m).any() else math.nan
    return out


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool at size=(W, H), nearest."""
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize(size, PIL.Image.NEAREST)) > 127


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of one size (1.0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """1 - scipy.spatial.distance.cosine(u, v) (what image_eval.py computes), in float64."""
    u, v = np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel()
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


# --- preprocessing, as torchvision's transforms do it on PIL images --------------------------------


def resize_short(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision ``Resize(size)`` (an int) on a PIL image: the short side becomes ``size``, the long
    side ``int(size * long / short)``; bicubic (``interpolation=3`` / ``BICUBIC`` in both transforms)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if new == (w, h) else img.resize(new, PIL.Image.BICUBIC)


def center_crop(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision ``CenterCrop(size)``: top = round((h - size) / 2), left = round((w - size) / 2)."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def clip_pixels(img) -> np.ndarray:
    """OpenAI CLIP's ViT-B/32 transform: float32 [3, 224, 224]."""
    x = to_unit(center_crop(resize_short(load_rgb(img), 224), 224))
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1).astype(np.float32)


def dino_pixels(img) -> np.ndarray:
    """image_eval.py's DINO transform: Resize(256, bicubic), CenterCrop(224), ImageNet normalization."""
    x = to_unit(center_crop(resize_short(load_rgb(img), 256), 224))
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


# --- embedding models -------------------------------------------------------------------------------


class EmbeddingError(LimeError, ValueError):
    """An embedding model folder cannot be loaded; the message names the folder and what it needs."""


_HUB_NAMES = {"clip": "openai/clip-vit-base-patch32", "dino": "facebook/dino-vits16"}


def _load(kind: str, folder, loader):
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise EmbeddingError(
            f"--{kind} {folder}: not a transformers model folder (no config.json). Download it once where "
            f"there is network ({_HUB_NAMES[kind]}, e.g. huggingface-cli download NAME --local-dir DIR) and pass that folder")
    try:
        return loader(path)
    except EmbeddingError:
        raise
    except Exception as e:
        raise EmbeddingError(f"--{kind} {folder}: cannot load ({type(e).__name__}: {e})") from None


def _complete(kind: str, folder, path: Path, cls, **kwargs):
    """``cls.from_pretrained(folder)``, refusing a checkpoint that lacks any weight of the model: transformers
    would initialise those at random (printing a MISSING table) and the metric would be noise."""
    import json

    kind_of = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    want = {"clip": ("clip",), "dino": ("vit", "dino")}[kind]  # dino: ViTModel configs say "vit"
    if kind_of not in want:
        raise EmbeddingError(f"--{kind} {folder}: its config.json holds a {kind_of!r} model, not a {cls.__name__} "
                             f"({'/'.join(want)}): pass a folder of {_HUB_NAMES[kind]}")
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ()) + sorted(str(k[0] if isinstance(k, tuple) else k)
                                                               for k in info.get("mismatched_keys") or ())
    if missing:
        parts = sorted({k.split(".")[0] for k in missing})
        raise EmbeddingError(
            f"--{kind} {folder}: {len(missing)} weight(s) of {cls.__name__} are missing or of the wrong shape in this "
            f"checkpoint (in {', '.join(parts[:6])}{', ...' if len(parts) > 6 else ''}; e.g. {missing[0]}) and would be "
            f"random: pass a folder with the whole model ({_HUB_NAMES[kind]})")
    return model


class Clip:
    """CLIP image and text embeddings (CLIP-I, CLIP-T) from a local transformers folder with the model and
    its tokenizer (``openai/clip-vit-base-patch32``: the ViT-B/32 of the official script)."""

    def __init__(self, folder, device="cpu"):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.model = _load("clip", folder, lambda p: _complete("clip", folder, p, CLIPModel)).eval().to(device)
        self.tokenizer = _load("clip", folder, lambda p: CLIPTokenizer.from_pretrained(p))
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        self.folder = str(folder)

    def images(self, imgs) -> np.ndarray:
        """PIL pictures (or paths) -> float64 [N, D] embeddings."""
        import torch

        x = torch.from_numpy(np.stack([clip_pixels(im) for im in imgs])).to(self.device, self.dtype)
        with torch.no_grad():
            out = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output)
        return out.double().cpu().numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> float64 [N, D] embeddings. Longer than CLIP's 77 tokens: cut to 77 (OpenAI's
        ``clip.tokenize`` raises there; no MagicBrush caption is that long)."""
        import torch

        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            out = self.model.text_projection(self.model.text_model(
                input_ids=ids.input_ids.to(self.device), attention_mask=ids.attention_mask.to(self.device)).pooler_output)
        return out.double().cpu().numpy()


class Dino:
    """DINO ViT-S/16 class-token embeddings from a local transformers folder (``facebook/dino-vits16``)."""

    def __init__(self, folder, device="cpu"):
        import torch
        from transformers import ViTModel

        self.model = _load("dino", folder, lambda p: _complete("dino", folder, p, ViTModel, add_pooling_layer=False)).eval().to(device)
        self.device = torch.device(device)
        self.dtype = next(self.model.parameters()).dtype
        self.folder = str(folder)

    def images(self, imgs) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.stack([dino_pixels(im) for im in imgs])).to(self.device, self.dtype)
        with torch.no_grad():
            out = self.model(pixel_values=x).last_hidden_state[:, 0]
        return out.double().cpu().numpy()
