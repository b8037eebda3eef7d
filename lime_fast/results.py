"""``EditResult``: one finished edit, with the pictures people would rather look at than read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from . import viz


@dataclass
class EditResult:
    """One finished edit.

    image: the edited image (PIL, RGB, at the input's size).
    roi_mask: bool [H, W] at the input's size (True = regularized region).
    roi_grid: bool [gh, gw] on the output grid.
    segments: int [gh, gw] k-means labels (None when a mask was given).
    heatmap: float32 [gh, gw] localization heatmap, min-max normalized to [0, 1] (None with a mask).
    tokens: content words that localized the edit; silenced: words silenced inside the RoI.
    instruction, input_image: what was asked, as given (RGB).
    timings: seconds per stage ('encode', 'localize', 'segment', 'edit', 'decode', 'total').
    unet_evals: UNet evaluations this edit took (batch-shared ones counted once per batch).
    fallback: None, or how the RoI was chosen when the instruction had no content words.
    """

    image: PIL.Image.Image
    roi_mask: np.ndarray
    roi_grid: np.ndarray
    segments: np.ndarray | None
    heatmap: np.ndarray | None
    tokens: list[str]
    silenced: list[str]
    instruction: str
    input_image: PIL.Image.Image
    timings: dict[str, float] = field(default_factory=dict)
    unet_evals: int = 0
    fallback: str | None = None

    @classmethod
    def build(cls, job, b: int, pixels: np.ndarray, roi_grid: np.ndarray, role, *, segments=None, heatmap=None,
              timings=None, unet_evals: int = 0) -> EditResult:
        """Edit b of ``job`` (``lime_fast.inputs.EditInputs``) from its host arrays: pixels uint8 [h, w, 3] at
        the working size, roi_grid bool [gh, gw], its ``TokenRoles``; segments / heatmap on the grid."""
        im = job.images[b]
        out = PIL.Image.fromarray(pixels)
        if out.size != im.size:
            out = out.resize(im.size, PIL.Image.LANCZOS)
        return cls(
            image=out,
            roi_mask=job.roi_at_input(b, roi_grid),
            roi_grid=roi_grid,
            segments=segments,
            heatmap=heatmap,
            tokens=list(role.content_words),
            silenced=role.silenced_words,
            instruction=role.instruction,
            input_image=im,
            timings=dict(timings or {}),
            unet_evals=unet_evals,
            fallback=role.fallback,
        )

    def overlay(self) -> PIL.Image.Image:
        """The input with the RoI tinted red and outlined."""
        return viz.overlay(self.input_image, self.roi_mask)

    def pictures(self) -> dict[str, PIL.Image.Image]:
        """Named pictures: roi (mask), overlay, segments and heatmap (when computed), panel."""
        size = self.input_image.size
        pics = {"roi": viz.mask_image(self.roi_mask), "overlay": self.overlay()}
        if self.segments is not None:
            pics["segments"] = viz.segment_image(self.segments, size)
        if self.heatmap is not None:
            pics["heatmap"] = viz.heatmap_image(self.heatmap, size)
        strip = [("input", self.input_image), ("RoI", pics["overlay"])]
        strip += [(name, pics[name]) for name in ("segments", "heatmap") if name in pics]
        strip.append(("edited", self.image))
        pics["panel"] = viz.panel(strip)
        return pics

    def save_pictures(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write every picture of ``pictures()`` as ``{prefix}{name}.png`` into out_dir; returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, pic in self.pictures().items():
            paths[name] = out / f"{prefix}{name}.png"
            pic.save(paths[name])
        return paths
