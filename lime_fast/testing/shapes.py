"""Synthetic "coloured shapes" edit data with exactly known edit regions.

Each sample is a small RGB image of 2-4 flat-coloured shapes (circle, square, triangle, star, diamond;
varied sizes, positions and rotations, some overlap) on a plain or lightly textured background, plus an
instruction, the edited target image and the exact mask of the pixels the edit changes. Three edit
kinds:

* ``recolor_one``: recolour one object, named so that it is unambiguous ("make the circle red",
  "turn the blue square green", "paint the yellow one pink");
* ``recolor_kind``: recolour every object of one shape ("make all the triangles yellow");
* ``background``: change the background colour, keeping its texture ("change the background to pink").

Instructions are phrased in many ways (stop words, verbs, adjectives, questions, capitals and
punctuation) so LIME's token rules matter. Everything is deterministic from the seed
(``numpy.random.default_rng(seed)``); shapes are drawn without anti-aliasing and the mask is the set of
pixels that differ between source and target, so it is exact.

API: ``make_sample(seed, size)`` -> ``Sample``; ``make_session(seed, turns, size)`` -> one ``Sample`` per
turn of a multi-turn session (each turn edits the previous target); ``write_magicbrush(out_dir, seeds)``
writes sessions in the layout of MagicBrush's test release (what ``lime-fast eval`` reads);
``ShapesDataset`` / ``make_batch`` give tensors for training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

__all__ = [
    "PALETTE",
    "SHAPES",
    "KINDS",
    "Sample",
    "make_sample",
    "make_session",
    "describe",
    "write_magicbrush",
    "ShapesDataset",
    "make_batch",
]

# Well-separated named colours: every pair differs by >= 60 in some channel, so a texture offset of at
# most +-16 can never make two of them equal.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (245, 225, 40),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (245, 130, 200),
    "cyan": (40, 210, 225),
    "brown": (125, 75, 30),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
PLURAL = {s: s + "s" for s in SHAPES}
KINDS: tuple[str, ...] = ("recolor_one", "recolor_kind", "background")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "noise", "gradient", "checker")
MAX_TEXTURE = 16  # |texture offset| <= this

# Instruction templates. {obj}: the object phrase ("the blue square", "all the triangles"); {col}: colour.
_OBJECT_TEMPLATES = (
    "make {obj} {col}",
    "turn {obj} {col}",
    "change the colour of {obj} to {col}",
    "change the color of {obj} to {col}",
    "paint {obj} {col}",
    "can you make {obj} {col}?",
    "{obj} should be {col}",
    "recolor {obj} {col}",
    "please colour {obj} {col}",
    "let's make {obj} {col}",
    "i want {obj} to be {col}",
)
_KIND_TEMPLATES = _OBJECT_TEMPLATES + ("make {obj} {col} please",)
_BACKGROUND_TEMPLATES = (
    "change the background to {col}",
    "make the background {col}",
    "turn the background {col}",
    "paint the backdrop {col}",
    "give it a {col} background",
    "the background should be {col}",
    "can you change the background colour to {col}?",
    "replace the background with {col}",
    "recolor the background {col}",
    "i want a {col} background",
    "set the background color to {col}",
)


@dataclass
class Sample:
    """One edit example. ``mask`` [H, W] bool is True exactly where ``target`` differs from ``source``."""

    source: PIL.Image.Image
    target: PIL.Image.Image
    mask: np.ndarray
    instruction: str
    kind: str
    target_color: str = ""
    subject: str = ""  # the words naming what is edited: "blue square", "triangles", "background"
    meta: dict = field(default_factory=dict)  # objects, background, texture, seed, size


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(r * 0.85, a) for a in (45, 135, 225, 315)]
    elif shape == "triangle":
        pts = [(r, a) for a in (-90, 30, 150)]
    elif shape == "diamond":
        pts = [(r, -90), (r * 0.62, 0), (r, 90), (r * 0.62, 180)]
    elif shape == "star":
        pts = [(r if i % 2 == 0 else r * 0.45, -90 + 36 * i) for i in range(10)]
    else:
        raise ValueError(shape)
    out = []
    for rad, a in pts:
        t = math.radians(a + angle)
        out.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
    return out


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    img = PIL.Image.new("L", (size, size), 0)
    draw = PIL.ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        angle = angle if shape != "diamond" else angle % 30 - 15  # diamonds stay roughly upright
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=255)
    return np.asarray(img) > 0


def _texture(rng: np.random.Generator, size: int) -> tuple[str, np.ndarray]:
    """A texture offset [H, W, 1] (int16, |offset| <= MAX_TEXTURE), shared by source and target."""
    kind = TEXTURES[rng.choice(len(TEXTURES), p=[0.4, 0.15, 0.15, 0.15, 0.15])]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = float(rng.uniform(8, MAX_TEXTURE))
    if kind == "plain":
        off = np.zeros((size, size), np.float32)
    elif kind == "stripes":
        period = int(rng.integers(4, 11))
        direction = int(rng.integers(3))
        coord = (yy, xx, xx + yy)[direction]
        off = np.where((coord // (period / 2)) % 2 == 0, amp, -amp)
    elif kind == "noise":
        off = rng.uniform(-amp, amp, (size, size)).astype(np.float32)
    elif kind == "gradient":
        t = math.radians(float(rng.uniform(0, 360)))
        ramp = (xx - size / 2) * math.cos(t) + (yy - size / 2) * math.sin(t)
        off = ramp / (size / math.sqrt(2)) * amp
    else:  # checker
        cell = int(rng.integers(4, 9))
        off = np.where(((xx // cell) + (yy // cell)) % 2 == 0, amp, -amp)
    return kind, np.clip(np.round(off), -MAX_TEXTURE, MAX_TEXTURE).astype(np.int16)[..., None]


def _render(bg: str, offset: np.ndarray, objects: list[dict], colors: Sequence[str]) -> np.ndarray:
    size = offset.shape[0]
    img = np.clip(np.asarray(PALETTE[bg], np.int16)[None, None] + offset, 0, 255).astype(np.uint8)
    img = np.array(np.broadcast_to(img, (size, size, 3)))
    for obj, c in zip(objects, colors):
        img[obj["mask"]] = PALETTE[c]
    return img


def _place_objects(rng: np.random.Generator, size: int, shapes: list[str], colors: list[str]) -> list[dict] | None:
    """Random placements; None when some object would be less than 45% visible (caller retries)."""
    objects = []
    for shape, color in zip(shapes, colors):
        r = float(rng.uniform(0.10, 0.21)) * size
        cx, cy = (float(rng.uniform(r * 0.9, size - r * 0.9)) for _ in range(2))
        angle = float(rng.uniform(0, 360)) if shape in ("triangle", "star", "square") and rng.random() < 0.5 else 0.0
        m = _shape_mask(shape, cx, cy, r, angle, size)
        objects.append({"shape": shape, "color": color, "cx": cx, "cy": cy, "r": r, "angle": angle, "mask": m})
    covered = np.zeros((size, size), bool)
    for obj in reversed(objects):  # later objects are drawn on top
        visible = obj["mask"] & ~covered
        if visible.sum() < max(12, 0.45 * obj["mask"].sum()):
            return None
        obj["visible"] = visible
        covered |= obj["mask"]
    return objects


def _size_word(obj: dict, size: int) -> str | None:
    if obj["r"] < 0.13 * size:
        return "small"
    if obj["r"] > 0.18 * size:
        return "big"
    return None


def _phrase(rng: np.random.Generator, templates: Sequence[str], obj: str, col: str) -> str:
    text = templates[rng.integers(len(templates))].format(obj=obj, col=col)
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.25 and not text.endswith("?"):
        text += "."
    return text


def _other_color(rng: np.random.Generator, avoid: Iterable[str]) -> str:
    choices = [c for c in PALETTE if c not in set(avoid)]
    return choices[rng.integers(len(choices))]


def _choose_edit(rng: np.random.Generator, kind: str, size: int, objects: list[dict], bg: str) -> dict | None:
    """Draw an edit of ``kind`` on a scene (objects with their current ``color``, background ``bg``):
    {new_colors, new_bg, instruction, subject, col}, or None when no object can be named uniquely
    (the caller redraws)."""
    n = len(objects)
    shapes = [o["shape"] for o in objects]
    colors = [o["color"] for o in objects]
    new_colors = list(colors)
    new_bg = bg
    if kind == "recolor_one":
        # an object that its shape, its colour or both name uniquely
        order = rng.permutation(n)
        chosen = None
        for i in order:
            s, c = shapes[i], colors[i]
            ways = []
            if shapes.count(s) == 1:
                ways.append("shape")
            if colors.count(c) == 1:
                ways.append("color")
            if sum(1 for s2, c2 in zip(shapes, colors) if (s2, c2) == (s, c)) == 1:
                ways.append("both")
            if ways:
                chosen = (int(i), ways)
                break
        if chosen is None:
            return None
        i, ways = chosen
        way = ways[rng.integers(len(ways))]
        col = _other_color(rng, [colors[i], bg])
        new_colors[i] = col
        s, c = shapes[i], colors[i]
        adj = _size_word(objects[i], size) if rng.random() < 0.3 else None
        noun = s if way != "color" else ("shape", "one", "object")[rng.integers(3)]
        words = ([adj] if adj and way != "color" else []) + ([c] if way != "shape" else []) + [noun]
        subject = " ".join(words)
        instruction = _phrase(rng, _OBJECT_TEMPLATES, "the " + subject, col)
    elif kind == "recolor_kind":
        s = shapes[int(rng.integers(n))]
        idx = [j for j in range(n) if shapes[j] == s]
        col = _other_color(rng, [colors[j] for j in idx] + [bg])
        for j in idx:
            new_colors[j] = col
        quant = ("all the {}", "all {}", "every {}", "each {}", "the {}", "all of the {}")[rng.integers(6)]
        noun = PLURAL[s] if "every" not in quant and "each" not in quant else s
        subject = noun
        instruction = _phrase(rng, _KIND_TEMPLATES, quant.format(noun), col)
    else:
        col = _other_color(rng, colors + [bg])
        new_bg = col
        instruction = _phrase(rng, _BACKGROUND_TEMPLATES, "", col)
        subject = "backdrop" if "backdrop" in instruction else "background"
    return {"new_colors": new_colors, "new_bg": new_bg, "instruction": instruction, "subject": subject, "col": col}


def _sample(seed: int, size: int, kind: str, texture: str, offset: np.ndarray, objects: list[dict], bg: str,
            edit: dict) -> Sample | None:
    """Render the scene before and after ``edit``; None when the edit changes no pixel."""
    colors = [o["color"] for o in objects]
    src = _render(bg, offset, objects, colors)
    tgt = _render(edit["new_bg"], offset, objects, edit["new_colors"])
    mask = (src != tgt).any(-1)
    if not mask.any():
        return None
    meta = {
        "seed": int(seed),
        "size": size,
        "background": bg,
        "new_background": edit["new_bg"],
        "texture": texture,
        "objects": [
            {"shape": o["shape"], "color": c0, "new_color": c1, "center": [round(o["cx"], 2), round(o["cy"], 2)], "radius": round(o["r"], 2), "angle": round(o["angle"], 1)}
            for o, c0, c1 in zip(objects, colors, edit["new_colors"])
        ],
    }
    return Sample(
        source=PIL.Image.fromarray(src, "RGB"),
        target=PIL.Image.fromarray(tgt, "RGB"),
        mask=mask,
        instruction=edit["instruction"],
        kind=kind,
        target_color=edit["col"],
        subject=edit["subject"],
        meta=meta,
    )


def _first_turn(seed: int, size: int) -> tuple[Sample, dict]:
    """make_sample's sample and the scene it edits (texture offset, objects, background)."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = np.random.default_rng([int(seed), 0x5A17E5])
    kind = KINDS[rng.choice(3, p=[0.5, 0.25, 0.25])]
    names = list(PALETTE)
    bg = names[rng.integers(len(names))]
    texture, offset = _texture(rng, size)

    for _ in range(200):
        n = int(rng.integers(2, 5))
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
        if kind == "recolor_kind" and len(set(shapes)) == n:  # usually make the edited kind repeat
            if rng.random() < 0.8:
                shapes[int(rng.integers(1, n))] = shapes[0]
        colors = [_other_color(rng, [bg]) for _ in range(n)]
        objects = _place_objects(rng, size, shapes, colors)
        if objects is None:
            continue
        edit = _choose_edit(rng, kind, size, objects, bg)
        if edit is None:
            continue
        sample = _sample(seed, size, kind, texture, offset, objects, bg, edit)
        if sample is None:
            continue
        return sample, {"texture": texture, "offset": offset, "objects": objects, "bg": bg, "edit": edit}
    raise RuntimeError(f"could not build a sample for seed {seed}")  # pragma: no cover (never seen)


def make_sample(seed: int, size: int = 64) -> Sample:
    """One deterministic edit example from ``seed`` (see the module docstring)."""
    return _first_turn(seed, size)[0]


def make_session(seed: int, turns: int = 2, size: int = 64) -> list[Sample]:
    """A multi-turn editing session: ``turns`` edits applied one after the other to one picture.

    Turn 1 is ``make_sample(seed, size)``; turn t > 1 draws a new edit (any kind, named by the scene's
    colours after turn t - 1, from ``default_rng([seed, 0x5A17E5, t])``) on the previous turn's target
    and renders it with the same texture and shapes, so every turn's source is exactly the previous
    target and every target and mask is exact. Deterministic from (seed, turns, size).
    """
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    first, scene = _first_turn(seed, size)
    samples = [first]
    objects = [dict(o, color=c) for o, c in zip(scene["objects"], scene["edit"]["new_colors"])]
    bg = scene["edit"]["new_bg"]
    for t in range(2, turns + 1):
        rng = np.random.default_rng([int(seed), 0x5A17E5, t])
        for _ in range(200):
            kind = KINDS[rng.choice(3, p=[0.5, 0.25, 0.25])]
            edit = _choose_edit(rng, kind, size, objects, bg)
            sample = None if edit is None else _sample(seed, size, kind, scene["texture"], scene["offset"], objects, bg, edit)
            if sample is not None:
                break
        else:  # pragma: no cover (never seen)
            raise RuntimeError(f"could not build turn {t} for seed {seed}")
        sample.meta["turn"] = t
        samples.append(sample)
        objects = [dict(o, color=c) for o, c in zip(objects, edit["new_colors"])]
        bg = edit["new_bg"]
    return samples


def describe(sample: Sample, which: str = "target") -> str:
    """A caption of the source or target picture ("a red circle and two blue squares on a striped
    pink background"), from ``sample.meta``: the global description MagicBrush keeps for each image."""
    key, bg_key = ("color", "background") if which == "source" else ("new_color", "new_background")
    counts: dict[tuple[str, str], int] = {}
    for o in sample.meta["objects"]:
        counts[(o[key], o["shape"])] = counts.get((o[key], o["shape"]), 0) + 1
    words = {1: "a", 2: "two", 3: "three", 4: "four"}
    parts = [f"{words[n]} {c} {PLURAL[s] if n > 1 else s}" for (c, s), n in counts.items()]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    texture = sample.meta["texture"]
    texture = "" if texture == "plain" else {"stripes": "striped ", "noise": "noisy ", "gradient": "shaded ", "checker": "checkered "}[texture]
    return f"{things} on a {texture}{sample.meta[bg_key]} background"


def write_magicbrush(out_dir: str | Path, seeds: Iterable[int], size: int = 64, turns: int = 1) -> Path:
    """Write shapes sessions in the layout of MagicBrush's test release, which ``lime-fast eval`` reads.

    ``out_dir/images/{i}/{i}-input.png``, ``{i}-output{t}.png`` and ``{i}-mask{t}.png`` (white = the
    pixels turn t changes) for each seed ``i`` and turn t = 1..``turns`` (``make_session``);
    ``edit_sessions.json`` ({"i": [{"input", "mask", "instruction", "output"}, ...]}: turn t's input is
    ``{i}-input.png`` for t = 1, else ``{i}-output{t-1}.png``), ``edit_turns.json`` (the same turns as
    one list), ``global_descriptions.json`` ({"i": {file: caption}} for the input and every output) and
    ``local_descriptions.json`` ({"i": {output file: what the edit made, e.g. "red circle"}}). The
    turns also carry the shapes fields ``kind``, ``target_color`` and ``subject``, which MagicBrush's
    own tools ignore. Returns ``out_dir``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    sessions: dict[str, list[dict]] = {}
    global_desc: dict[str, dict[str, str]] = {}
    local_desc: dict[str, dict[str, str]] = {}
    for seed in seeds:
        i = str(int(seed))
        folder = out / "images" / i
        folder.mkdir(exist_ok=True)
        samples = make_session(int(seed), turns, size)
        samples[0].source.save(folder / f"{i}-input.png")
        global_desc[i] = {f"{i}-input.png": describe(samples[0], "source")}
        local_desc[i] = {}
        sessions[i] = []
        for t, s in enumerate(samples, start=1):
            output, mask = f"{i}-output{t}.png", f"{i}-mask{t}.png"
            s.target.save(folder / output)
            PIL.Image.fromarray((s.mask * 255).astype(np.uint8), "L").save(folder / mask)
            global_desc[i][output] = describe(s, "target")
            local_desc[i][output] = f"{s.target_color} {s.subject}"
            sessions[i].append({
                "input": f"{i}-input.png" if t == 1 else f"{i}-output{t - 1}.png",
                "mask": mask,
                "instruction": s.instruction,
                "output": output,
                "kind": s.kind,
                "target_color": s.target_color,
                "subject": s.subject,
            })
    for name, data in (("edit_sessions.json", sessions), ("edit_turns.json", [t for v in sessions.values() for t in v]),
                       ("global_descriptions.json", global_desc), ("local_descriptions.json", local_desc)):
        (out / name).write_text(json.dumps(data, indent=1))
    return out


def _to_tensor(img: PIL.Image.Image):
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def make_batch(seeds: Sequence[int], size: int = 64) -> dict:
    """Stacked training tensors for ``seeds``: ``source``/``target`` [B, 3, H, W] in [-1, 1],
    ``mask`` [B, H, W] bool, ``instruction`` list[str], ``kind`` list[str]."""
    import torch

    samples = [make_sample(int(s), size) for s in seeds]
    return {
        "source": torch.stack([_to_tensor(s.source) for s in samples]),
        "target": torch.stack([_to_tensor(s.target) for s in samples]),
        "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
        "instruction": [s.instruction for s in samples],
        "kind": [s.kind for s in samples],
    }


try:
    from torch.utils.data import Dataset as _Dataset
except ImportError:  # pragma: no cover
    _Dataset = object


class ShapesDataset(_Dataset):
    """A map-style torch ``Dataset`` over ``seeds``; item i is ``make_sample(seeds[i])`` as tensors
    (``source``, ``target`` [3, H, W] in [-1, 1], ``mask`` [H, W] bool, ``instruction``, ``kind``)."""

    def __init__(self, seeds: Sequence[int], size: int = 64):
        self.seeds = list(seeds)
        self.size = size

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict:
        import torch

        s = make_sample(self.seeds[i], self.size)
        return {
            "source": _to_tensor(s.source),
            "target": _to_tensor(s.target),
            "mask": torch.from_numpy(s.mask),
            "instruction": s.instruction,
            "kind": s.kind,
        }
