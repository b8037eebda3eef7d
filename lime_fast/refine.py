"""Refining an edit's region: correct LIME's automatic RoI and pay only the edit pass again.

    result = lime_fast.edit("photo.jpg", "make the hat red")
    fixed = result.refine(add=[3], remove=[(120, 40)])   # segment 3 in; the segment under pixel (120, 40) out
    fixed = result.refine(mask="hat.png")                 # a painted region instead
    fixed = result.refine(segments=[3, 5])                # exactly segments 3 and 5

A refinement reuses what the first edit computed (``RefineCache``: the image latents, text embeddings and
drawn noise; the segments and heatmap live on the result itself) and runs only stage 2 (the regularized
edit pass, ``LimeEngine.edit_pass``) and the decode: no encode, no localization pass, no k-means. With the
same region it is the same computation as the first edit's pass, so the same image bit for bit; with a
painted region M it is the same computation as ``engine.edit(image, instruction, mask=M)`` with the same
seed and settings (tests/test_refine.py).

How the region is built (``refined_region``), starting from the result's own RoI (a refined result's
RoI for a chain of refinements):

1. ``segments=[...]``: start from exactly these segments instead; ``mask`` with ``mask_mode="replace"``
   (the default): start from the painted mask instead;
2. ``add``: union with these segments; ``remove``: minus these segments;
3. ``mask`` with ``mask_mode="add"``: union with the painted mask; ``"cut"``: minus it.

``add`` / ``remove`` / ``segments`` take segment ids (ints, the labels of ``result.segments``; the
``segment_ids`` picture of ``result.pictures()`` shows them) and points ``(x, y)`` in input-image pixels
meaning "the segment under this pixel" (as the segment picture at the input's size shows it). A list
holds several; a bare tuple of two numbers is one point; a bare int one id.

What is kept alive, and its memory. A result keeps a weak reference to its engine (a result never keeps
a model loaded: when the engine is unloaded, e.g. dropped from ``lime_fast.get_engine``'s cache and
garbage-collected, ``refine`` raises ``RefineUnavailableError``) and, on the engine's device, its edit's
image latents [1, c, h, w], text embeddings [1, 77, C] (+ the shared empty-prompt embedding and SDXL's
pooled / time-id conditions), the initial latents [1, c, h, w] and the ancestral noise
[steps, 1, c, h, w]. For SD 1.5 at 512 x 512 with 30 steps that is 4*64*64 (latents) + 2*77*768 (text,
empty) + 31*4*64*64 (noise) = 634,880 values: 1.27 MB in fp16 on a GPU, 2.54 MB in fp32 on a CPU; the
noise is four fifths of it. ``EditResult.refine_bytes`` says what one result holds; ``release()`` drops
it (the segments, heatmap and pictures stay); ``LimeEngine.keep_for_refine = False`` makes an engine's
results keep nothing. A pickled or unpickled result is not refinable (the cache is dropped).
"""

from __future__ import annotations

import dataclasses
import numbers
import time
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import PIL.Image

from .errors import LimeWarning, RefineError, RefineUnavailableError

MASK_MODES = ("replace", "add", "cut")


@dataclass(frozen=True)
class Refinement:
    """How a refined result's region was made (``EditResult.refinement``).

    segments: the ids that made the starting region (``segments=``), or None (the previous RoI or a mask);
    added / removed: segment ids added and removed (points resolved to their segments);
    mask_mode: how a painted mask was applied ("replace", "add", "cut"), None without a mask;
    skipped: the stages that were not run again (their results were reused).
    """

    segments: tuple[int, ...] | None = None
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    mask_mode: str | None = None
    skipped: tuple[str, ...] = ("encode", "localize", "segment")


@dataclass
class RefineCache:
    """What refining one edit needs besides the result's own fields; tensors on the engine's device.

    engine: weak reference to the ``LimeEngine``; enc: that edit's ``Encoded`` (batch 1); noise: its
    (initial latents [1, c, h, w], ancestral noise [steps, 1, c, h, w]); seed, cfg: the edit's;
    working_size: (w, h) pixels at which the UNet ran; dropped: why the tensors are gone (None: usable).
    """

    engine: weakref.ref | None
    enc: object | None
    noise: tuple | None
    seed: int
    cfg: object
    working_size: tuple[int, int]
    dropped: str | None = None

    def nbytes(self) -> int:
        """Bytes of the cached tensors (0 once dropped)."""
        if self.dropped is not None:
            return 0
        e = self.enc
        tensors = [e.image_latents, e.text_embeds, e.empty_embeds, e.keep, e.content, e.pooled, e.empty_pooled,
                   e.time_ids, *self.noise]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def drop(self, reason: str) -> RefineCache:
        """A copy without the tensors that remembers why (other results sharing them keep theirs)."""
        return dataclasses.replace(self, engine=None, enc=None, noise=None, dropped=reason)

    def usable(self):
        """The live engine; ``RefineUnavailableError`` saying why not."""
        if self.dropped is not None:
            raise RefineUnavailableError(f"this result can no longer be refined: {self.dropped}; re-run the edit")
        engine = self.engine()
        if engine is None:
            raise RefineUnavailableError(
                "the engine that made this result was unloaded (garbage-collected, e.g. dropped from "
                "lime_fast.get_engine's cache): its model is gone, so the result cannot be refined; re-run "
                "the edit, keeping a reference to the engine (lime_fast.get_engine) while you refine")
        return engine

    # pickling drops the tensors and the weak reference (neither survives another process)
    def __getstate__(self):
        return dict(self.drop("it was pickled (the cache is not saved)").__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __deepcopy__(self, memo):  # the tensors are never changed in place: a copy may share them
        return dataclasses.replace(self)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_id(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_point(v, kinds=(tuple, list)) -> bool:
    return isinstance(v, kinds) and len(v) == 2 and all(_is_number(x) for x in v)


def _items(targets, what: str) -> list:
    """``targets`` as a list of ids (int) and points ((x, y) floats); RefineError for anything else."""
    if targets is None:
        return []
    if _is_id(targets) or _is_point(targets, tuple):  # a bare id, a bare (x, y) point
        targets = [targets]
    elif isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise RefineError(f"{what}: expected segment ids (ints) and/or points (x, y), got {targets!r}")
    out = []
    for t in targets:
        if _is_id(t):
            out.append(int(t))
        elif _is_point(t):
            out.append(tuple(float(v) for v in t))
        else:
            raise RefineError(f"{what}: {t!r} is neither a segment id (int) nor a point (x, y) in pixels")
    return out


def segment_ids(targets, segments: np.ndarray | None, image_size: tuple[int, int], what: str) -> tuple[int, ...]:
    """Segment ids named by ``targets`` (ids and points, see the module's docstring), in order, once each.

    segments: int [gh, gw] labels (None: the edit had a user mask, so only an empty ``targets`` is valid);
    image_size: (W, H) of the input in pixels. A point maps to the segment the segment picture shows
    under it (the grid resized to the input, nearest). RefineError for an id not in the map or a point
    outside the image."""
    items = _items(targets, what)
    if not items:
        return ()
    if segments is None:
        raise RefineError(f"{what}: this edit has no segments (its region was a user mask, so nothing was "
                          "segmented); refine it with mask=")
    present = [int(v) for v in np.unique(segments)]
    w, h = image_size
    at_input = None
    ids = []
    for t in items:
        if isinstance(t, tuple):
            x, y = t
            if not (0 <= x < w and 0 <= y < h):
                raise RefineError(f"{what}: the point ({x:g}, {y:g}) is outside the {w} x {h} input image "
                                  "(x in [0, width), y in [0, height), in pixels)")
            if at_input is None:  # PIL's nearest, as viz.segment_image draws the map at the input's size
                at_input = np.asarray(PIL.Image.fromarray(segments.astype(np.int32), "I").resize((w, h), PIL.Image.NEAREST))
            ids.append(int(at_input[int(y), int(x)]))
        elif t not in present:
            raise RefineError(f"{what}: there is no segment {t} in this edit; its segments are "
                              f"{', '.join(map(str, present))} (the segment_ids picture shows where)")
        else:
            ids.append(t)
    return tuple(dict.fromkeys(ids))


def refined_region(base: np.ndarray, segments: np.ndarray | None, *, only: tuple[int, ...] | None,
                   added: tuple[int, ...], removed: tuple[int, ...], painted: np.ndarray | None,
                   mask_mode: str) -> np.ndarray:
    """The new RoI, bool [gh, gw] (the order of the module's docstring). base: the current RoI [gh, gw];
    painted: the user's mask on the grid [gh, gw] or None."""
    both = set(added) & set(removed)
    if both:
        raise RefineError(f"segment(s) {', '.join(map(str, sorted(both)))} both added and removed")
    if only is not None:
        roi = np.isin(segments, only)
    elif painted is not None and mask_mode == "replace":
        roi = painted.copy()
    else:
        roi = base.copy()
    if added:
        roi |= np.isin(segments, added)
    if removed:
        roi &= ~np.isin(segments, removed)
    if painted is not None and mask_mode == "add":
        roi |= painted
    elif painted is not None and mask_mode == "cut":
        roi &= ~painted
    return roi


def refine(cache: RefineCache, *, base_roi: np.ndarray, segments, heatmap, input_image: PIL.Image.Image,
           add=None, remove=None, only=None, mask=None, mask_mode: str = "replace", mask_convention: str = "auto",
           progress: bool = False, skipped=("encode", "localize", "segment"), extra_timings=None):
    """A new ``EditResult``: the edit pass and decode again with the region built from ``base_roi``
    (bool [gh, gw]) and the request (the module's docstring). segments / heatmap: the edit's [gh, gw]
    arrays (carried into the new result); input_image: the edit's input (RGB, its own size).
    ``EditResult.refine`` and ``lime-fast edit --session`` call this."""
    from .inputs import EditInputs, _mask_to_grid, check_mask_shape, load_mask
    from .results import EditResult

    t0 = time.perf_counter()
    engine = cache.usable()
    if mask_mode not in MASK_MODES:
        raise RefineError(f"mask_mode must be one of {', '.join(MASK_MODES)}; got {mask_mode!r}")
    size = input_image.size
    chosen = None if only is None else segment_ids(only, segments, size, "segments")
    added, removed = segment_ids(add, segments, size, "add"), segment_ids(remove, segments, size, "remove")
    user = None if mask is None else load_mask(mask, "refine mask", mask_convention)
    if user is not None:
        check_mask_shape(user, size)
    grid = tuple(base_roi.shape)
    # a pure painted region is exactly a user-mask edit: its RoI at the input's size is the mask itself
    pure = user is not None and mask_mode == "replace" and not (added or removed or chosen is not None)
    job = EditInputs([input_image], [cache.enc.roles[0].instruction], [user if pure else None], cache.working_size, grid)
    painted = None if user is None else (job.mask_grids()[0] if pure else _mask_to_grid(user, grid))
    roi = refined_region(base_roi, segments, only=chosen, added=added, removed=removed, painted=painted,
                         mask_mode=mask_mode)
    if not pure and not roi.any():
        warnings.warn("the refined region is empty: nothing is regularized, the edit is plain InstructPix2Pix",
                      LimeWarning, stacklevel=3)
    prep = time.perf_counter() - t0
    pixels, timings, evals = engine.refine_pass(cache, roi, progress=progress)
    timings = {**(extra_timings or {}), "refine": prep, **timings}
    timings["total"] = time.perf_counter() - t0 + (extra_timings or {}).get("total", 0.0)
    out = EditResult.build(job, 0, pixels, roi, cache.enc.roles[0], segments=segments, heatmap=heatmap,
                           timings=timings, unet_evals=evals, cache=cache)
    out.refinement = Refinement(chosen, added, removed, None if user is None else mask_mode, tuple(skipped))
    return out
