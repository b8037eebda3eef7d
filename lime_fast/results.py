"""``EditResult``: one finished edit, with the pictures people would rather look at than read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image

from . import viz
from .refine import RefineCache, Refinement


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
    refinement: None, or how ``refine`` made this result's region (``lime_fast.refine.Refinement``: segments
    added and removed, the mask mode, the stages skipped); its timings then have 'refine' (building the
    region), 'edit', 'decode' and 'total', and no 'localize' / 'segment'.

    ``refine`` redoes only the edit pass with a corrected region; for that a result keeps a weak reference
    to its engine and about 1.3 MB (SD 1.5, 512 x 512, fp16) of tensors on its device (``refine_bytes``;
    ``release()`` drops them; ``lime_fast/refine.py`` says what they are).
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
    refinement: Refinement | None = None
    _cache: RefineCache | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, job, b: int, pixels: np.ndarray, roi_grid: np.ndarray, role, *, segments=None, heatmap=None,
              timings=None, unet_evals: int = 0, cache: RefineCache | None = None) -> EditResult:
        """Edit b of ``job`` (``lime_fast.inputs.EditInputs``) from its host arrays: pixels uint8 [h, w, 3] at
        the working size, roi_grid bool [gh, gw], its ``TokenRoles``; segments / heatmap on the grid;
        cache: what ``refine`` needs (None: the result cannot be refined)."""
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
            _cache=cache,
        )

    def refine(self, add=None, remove=None, *, segments=None, mask=None, mask_mode: str = "replace",
               mask_convention: str = "auto", progress: bool = False) -> EditResult:
        """A new result with a corrected region, running only the edit pass and the decode again (the
        encoding, noise, segments and heatmap of this edit are reused): the same image as this one for
        the same region, bit for bit, and as ``engine.edit(..., mask=M)`` for a painted region M.

        add / remove: segment ids (ints, labels of ``self.segments``; the ``segment_ids`` picture shows
        them) and/or points (x, y) in input-image pixels ("the segment under this pixel"): an int, one
        (x, y) tuple, or a list of them. segments: start from exactly these segments instead of this
        result's RoI. mask: a painted region (any input ``lime_fast.inputs.load_mask`` reads, with
        ``mask_convention``), applied by ``mask_mode``: "replace" (default: the region is the mask, before
        add / remove), "add" or "cut" (union with it / minus it, after add / remove).

        Raises ``RefineError`` for an unknown id, a point outside the image, or segments of an edit that
        had a user mask; ``RefineUnavailableError`` after ``release()``, unpickling, or when the engine is
        gone. The new result can be refined again (it starts from its own region)."""
        from .refine import refine

        if self._cache is None:
            from .errors import RefineUnavailableError

            raise RefineUnavailableError("this result was made without a refine cache (LimeEngine.keep_for_refine "
                                         "was False, or it was built by hand); re-run the edit")
        return refine(self._cache, base_roi=self.roi_grid, segments=self.segments, heatmap=self.heatmap,
                      input_image=self.input_image, add=add, remove=remove, only=segments, mask=mask,
                      mask_mode=mask_mode, mask_convention=mask_convention, progress=progress)

    @property
    def refine_bytes(self) -> int:
        """Bytes of device memory this result keeps for ``refine`` (0 after ``release()``)."""
        return 0 if self._cache is None else self._cache.nbytes()

    def release(self) -> None:
        """Drop what ``refine`` needs (the cached tensors and the engine reference); the image, RoI,
        segments, heatmap and pictures stay. Refining afterwards raises ``RefineUnavailableError``."""
        if self._cache is not None:
            self._cache = self._cache.drop("release() dropped its cache")

    def overlay(self) -> PIL.Image.Image:
        """The input with the RoI tinted red and outlined."""
        return viz.overlay(self.input_image, self.roi_mask)

    def pictures(self) -> dict[str, PIL.Image.Image]:
        """Named pictures: roi (mask), overlay, segments, segment_ids (the map with each segment's id and a
        legend: what ``refine`` takes) and heatmap (when computed), panel."""
        size = self.input_image.size
        pics = {"roi": viz.mask_image(self.roi_mask), "overlay": self.overlay()}
        if self.segments is not None:
            pics["segments"] = viz.segment_image(self.segments, size)
            pics["segment_ids"] = viz.segment_id_image(self.segments, size, self.roi_grid)
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
