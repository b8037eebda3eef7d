"""Multi-turn editing: a sequence of instructions, each applied to the previous turn's output.

    results = lime_fast.edit_turns("photo.jpg", ["add a hat", "make the hat red"])
    results[-1].image.save("final.png")          # results[k]: turn k+1's EditResult (image, RoI, tokens)

This is MagicBrush's multi-turn ("iterative") setting, which the LIME paper's Table 1 reports: turn t
edits the image turn t - 1 produced, with the same settings and seed for every turn (as MagicBrush's
``edit_cli_single_multi_turn.py`` does). Each turn is one ``LimeEngine.edit``; an output is a uint8 RGB
picture, so feeding it on in memory is the same as saving it as PNG and reading it back (what
``lime-fast eval`` does to resume a killed run).
"""

from __future__ import annotations

from collections.abc import Sequence

from .config import DEFAULT_MODEL, EditConfig
from .engine import EditResult, LimeEngine
from .errors import TurnError


def edit_turns(
    image,
    instructions: Sequence[str],
    *,
    masks: Sequence | None = None,
    mask_convention: str = "auto",
    model=DEFAULT_MODEL,
    device=None,
    torch_dtype=None,
    progress: bool = True,
    on_turn=None,
    **config,
) -> list[EditResult]:
    """Apply ``instructions`` one after the other, each to the previous turn's output.

    Args:
        image: the first turn's input (path, PIL, numpy or torch; any mode and size, as ``lime_fast.edit``).
        instructions: one instruction per turn (a list, not a single string).
        masks: optional, one entry per turn: that turn's RoI (path, PIL, numpy or torch; True/white =
            edit here) or None for the automatic RoI. An all-False mask makes that turn plain
            InstructPix2Pix.
        mask_convention: how mask files and PIL masks mark their region (as ``lime_fast.edit``).
        model: as ``lime_fast.edit`` (hub id, local folder, shipped model name, pipeline or ``LimeEngine``).
        device, torch_dtype, progress: as ``lime_fast.edit``.
        on_turn: optional ``on_turn(t, result)``, called as soon as turn t (1-based) finishes, e.g. to save
            it: a Ctrl-C later then loses nothing that finished (``lime-fast edit --then`` does this).
        **config: ``EditConfig`` fields (or ``config=EditConfig(...)``) used for every turn.

    Returns:
        One ``EditResult`` per turn, in order; turn t's ``input_image`` is turn t - 1's ``image``.
        Everything is checked (instructions, masks, the first image, the config) before a model loads.

    Raises:
        TurnError: a turn failed after earlier ones finished; its ``results`` holds them and its
            ``__cause__`` is the turn's error. A failure of the first turn raises that error itself.
    """
    from . import get_engine
    from .inputs import check_instruction, load_image, load_mask
    from .models import default_config

    if isinstance(instructions, str) or not isinstance(instructions, Sequence):
        raise TypeError("instructions must be a list of strings, one per turn (for one edit use lime_fast.edit)")
    if not instructions:
        raise ValueError("instructions is empty: give at least one turn")
    texts = [check_instruction(t) for t in instructions]
    masks = [None] * len(texts) if masks is None else list(masks)
    if len(masks) != len(texts):
        raise ValueError(f"got {len(masks)} masks for {len(texts)} instructions (use None for an automatic RoI)")
    # validate everything before loading anything
    cfg = config.get("config")
    if cfg is not None and not isinstance(cfg, EditConfig):
        raise TypeError(f"config must be an EditConfig, got {type(cfg).__name__}")
    base = model.default_config if isinstance(model, LimeEngine) else default_config(model)
    (cfg or base).replace(**{k: v for k, v in config.items() if k != "config"})
    current = load_image(image)
    checked = [None if m is None else load_mask(m, f"mask of turn {t}", mask_convention)
               for t, m in enumerate(masks, start=1)]
    engine = get_engine(model, device=device, torch_dtype=torch_dtype)
    results: list[EditResult] = []
    for t, (text, mask) in enumerate(zip(texts, checked), start=1):
        try:
            result = engine.edit(current, text, mask=mask, progress=progress, **config)
        except Exception as e:
            if not results:
                raise
            raise TurnError(f"turn {t} of {len(texts)} failed ({type(e).__name__}: {e}); turns 1-{t - 1} finished "
                            "(this error's .results)", t, results) from e
        results.append(result)
        current = result.image
        if on_turn is not None:
            on_turn(t, result)
    return results
