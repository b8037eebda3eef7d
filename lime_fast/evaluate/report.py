"""Reports of an evaluation: per-sample CSV, summary Markdown and JSON, and a grid of the worst and best edits.

    DIR/samples.csv    one row per (method, setting, scored pair): ids, status, every metric
    DIR/summary.md     one table per setting (and per edit kind when the data has kinds)
    DIR/summary.json   the same numbers, the run's settings and, when shown, the paper's
    DIR/grid.png       input | target | each method's output, for the worst and best edits

The paper's numbers (LIME, WACV 2025, Table 1, MagicBrush test set) are put beside ours when the run
is MagicBrush with real weights (``paper=True``; ``lime-fast eval`` decides, see its ``--paper``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from .run import METRICS, Evaluation

# LIME (Simsar et al., WACV 2025), Table 1, MagicBrush test set: L1, L2, CLIP-I, DINO, CLIP-T. From the
# table picture on the authors' project page (github.com/enisimsar/LIME, static/images/magicbrush.png);
# "MagicBrush" = InstructPix2Pix fine-tuned on MagicBrush's training set. The CLIP-T of the targets
# themselves ("oracle"): 0.307 single-turn, 0.309 multi-turn (the page's text).
PAPER_COLUMNS = ("l1", "l2", "clip_i", "dino", "clip_t")
PAPER = {
    "single": {
        "InstructPix2Pix": (0.112, 0.037, 0.852, 0.743, 0.276),
        "InstructPix2Pix + LIME": (0.058, 0.017, 0.935, 0.906, 0.293),
        "MagicBrush-finetuned InstructPix2Pix": (0.063, 0.020, 0.933, 0.899, 0.278),
        "MagicBrush-finetuned InstructPix2Pix + LIME": (0.056, 0.017, 0.939, 0.911, 0.297),
    },
    "multi": {
        "InstructPix2Pix": (0.158, 0.060, 0.792, 0.618, 0.273),
        "InstructPix2Pix + LIME": (0.094, 0.033, 0.883, 0.817, 0.284),
        "MagicBrush-finetuned InstructPix2Pix": (0.096, 0.035, 0.892, 0.827, 0.275),
        "MagicBrush-finetuned InstructPix2Pix + LIME": (0.088, 0.030, 0.894, 0.835, 0.294),
    },
}
PAPER_ORACLE_CLIP_T = {"single": 0.307, "multi": 0.309}

HEADERS = {"l1": "L1 ↓", "l2": "L2 ↓", "clip_i": "CLIP-I ↑", "dino": "DINO ↑", "clip_t": "CLIP-T ↑",
           "l1_in": "L1 in mask", "l1_out": "L1 outside", "roi_iou": "RoI IoU"}
SETTING_TITLES = {
    "single": "Single-turn (every turn edited from its ground-truth input; all turns scored)",
    "multi": "Multi-turn (each turn edits the previous output; final turn vs final target)",
}
CSV_COLUMNS = ("method", "setting", "session", "turn", "id", "status", *METRICS, "mask_area", "roi_area", "kind",
               "instruction", "image", "input", "target", "error")


def _fmt(v, digits: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def write_csv(ev: Evaluation, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for x in ev.samples:
            w.writerow({k: ("" if x.get(k) is None else x.get(k)) for k in CSV_COLUMNS})
    return path


def _columns(ev: Evaluation, setting: str) -> list[str]:
    """The metrics to show: MagicBrush's five, then the mask metrics when the data has masks."""
    rows = ev.summary[setting].values()
    cols = list(PAPER_COLUMNS)
    cols += [k for k in ("l1_in", "l1_out", "roi_iou") if any(r.get(k) is not None for r in rows)]
    return cols


def markdown(ev: Evaluation, paper: bool = False) -> str:
    """The summary tables (the run, then one table per setting, then per edit kind when known)."""
    d = ev.dataset
    lines = [f"# lime-fast eval: {d.layout} data at {d.root}", "",
             f"{len(d.sessions)} sessions, {d.turns} turns; model {ev.model}; "
             f"edits this run: {ev.done} made, {ev.skipped} already done, {ev.failed} failed; {ev.seconds:.0f} s."
             + (f" {ev.redone} of them redone: their data, method, config or model changed since their earlier edit "
                "(or it had no resume key)." if ev.redone else ""),
             "Config: " + ", ".join(f"{k}={v}" for k, v in sorted(ev.config.items())) + ".", ""]
    missing = [n for n, k in (("CLIP-I and CLIP-T", "clip"), ("DINO", "dino")) if ev.models.get(k) is None]
    if missing:
        lines += [f"Not computed: {' and '.join(missing)} (give --clip / --dino: local folders of "
                  "openai/clip-vit-base-patch32 and facebook/dino-vits16).", ""]
    if ev.models.get("clip") is not None and d.captions is None and d.layout != "manifest":
        lines += ["CLIP-T: no caption file was found (--captions FILE), so it is not computed.", ""]
    if d.problems:
        lines += [f"{len(d.problems)} problem(s) in the data (left out): " + "; ".join(d.problems[:5])
                  + (" ..." if len(d.problems) > 5 else ""), ""]
    for setting in ev.settings:
        cols = _columns(ev, setting)
        rows = ev.summary[setting]
        n = max((r["n"] + r["failed"] for r in rows.values()), default=0)
        lines += [f"## {SETTING_TITLES[setting]}: {n} pairs", "",
                  "| method | " + " | ".join(HEADERS[c] for c in cols) + " | scored | failed |",
                  "|---|" + "---|" * (len(cols) + 2)]
        for m in ev.methods:
            r = rows[m.spec]
            lines.append(f"| {m.label} | " + " | ".join(_fmt(r[c]) for c in cols) + f" | {r['n']} | {r['failed']} |")
        if paper:
            for name, vals in PAPER[setting].items():
                cells = [f"*{v:.3f}*" for v in vals] + ["" for _ in cols[len(PAPER_COLUMNS):]]
                lines.append(f"| *paper: {name}* | " + " | ".join(cells) + " | | |")
        oracle = [r["clip_t_oracle"] for r in rows.values() if r.get("clip_t_oracle") is not None]
        if oracle:
            lines += ["", f"CLIP-T of the targets themselves (oracle): {oracle[0]:.4f}"
                      + (f" (paper: {PAPER_ORACLE_CLIP_T[setting]:.3f})" if paper else "")
                      + f"; CLIP-T over the {rows[ev.methods[0].spec]['n_clip_t']} pairs with a caption."]
        lines.append("")
        kinds = sorted({x["kind"] for x in ev.samples if x["setting"] == setting and x["kind"]})
        if len(kinds) > 1:
            kcols = [c for c in ("l1", "l1_in", "l1_out", "roi_iou") if c in cols]
            pairs = [(c, m) for c in kcols for m in ev.methods if c != "roi_iou" or m.roi == "auto"]
            lines += [f"### {setting}-turn, by edit kind", "",
                      "| kind | pairs | " + " | ".join(f"{HEADERS[c]}: {m.spec}" for c, m in pairs) + " |",
                      "|---|---|" + "---|" * len(pairs)]
            for k in kinds:
                cells = []
                for c, m in pairs:
                    vals = [x[c] for x in ev.samples if x["setting"] == setting and x["kind"] == k
                            and x["method"] == m.spec and x[c] is not None and not math.isnan(x[c])]
                    cells.append(_fmt(sum(vals) / len(vals) if vals else None))
                count = sum(1 for x in ev.samples if x["setting"] == setting and x["kind"] == k
                            and x["method"] == ev.methods[0].spec)
                lines.append(f"| {k} | {count} | " + " | ".join(cells) + " |")
            lines.append("")
    if paper:
        lines += ["Paper: LIME (Simsar et al., WACV 2025), Table 1, MagicBrush test set; \"MagicBrush-finetuned\" "
                  "= InstructPix2Pix fine-tuned on MagicBrush.", ""]
    return "\n".join(lines)


def summary_json(ev: Evaluation, paper: bool = False) -> dict:
    d = ev.dataset
    out = {
        "dataset": {"layout": d.layout, "root": str(d.root), "sessions": len(d.sessions), "turns": d.turns,
                    "captions": None if d.captions is None else str(d.captions), "problems": d.problems[:100],
                    "n_problems": len(d.problems)},
        "model": ev.model,
        "config": ev.config,
        "methods": [{"spec": m.spec, "label": m.label, "folder": m.folder, "overrides": dict(m.overrides)}
                    for m in ev.methods],
        "settings": list(ev.settings),
        "embedding_models": ev.models,
        "edits": {"done": ev.done, "skipped": ev.skipped, "failed": ev.failed, "redone": ev.redone},
        "seconds": round(ev.seconds, 2),
        "summary": ev.summary,
    }
    if paper:
        out["paper"] = {"source": "LIME (Simsar et al., WACV 2025), Table 1, MagicBrush test set",
                        "columns": list(PAPER_COLUMNS), "rows": PAPER, "oracle_clip_t": PAPER_ORACLE_CLIP_T}
    return out


def _tile(img: PIL.Image.Image, side: int) -> PIL.Image.Image:
    w, h = img.size
    size = (max(1, round(w * side / h)), side)
    return img.convert("RGB").resize(size, PIL.Image.NEAREST if h < side else PIL.Image.LANCZOS)


def grid(ev: Evaluation, path: Path, n: int = 4, side: int = 128) -> Path | None:
    """A PNG of the ``n`` worst and ``n`` best pairs by L1 of the first lime_fast method (else the first
    method), first setting: per row input | target | every method's output | that method's RoI.
    Returns None when no pair was scored."""
    from .. import viz
    from ..batch.store import image_path
    from .datasets import read_mask
    from .metrics import load_rgb

    setting = ev.settings[0]
    ref = next((m for m in ev.methods if m.roi == "auto"), next((m for m in ev.methods if m.name != "ip2p"), ev.methods[0]))
    ranked = sorted((x for x in ev.samples if x["setting"] == setting and x["method"] == ref.spec
                     and x["status"] == "done" and x["l1"] is not None), key=lambda x: x["l1"], reverse=True)
    if not ranked:
        return None
    picked = [("worst", i, x) for i, x in enumerate(ranked[:n], 1)]
    picked += [("best", i, x) for i, x in enumerate(reversed(ranked[n:][-n:]), 1)]
    heads = ["input", "target"] + [m.spec for m in ev.methods] + [f"RoI ({ref.spec})"]
    rows = []
    for tag, i, x in picked:
        tiles = [_tile(load_rgb(x["input"]), side), _tile(load_rgb(x["target"]), side)]
        for m in ev.methods:
            p = image_path(ev.out_dir / m.folder, x["id"])
            tiles.append(_tile(load_rgb(p), side) if p.is_file() else PIL.Image.new("RGB", tiles[1].size, "white"))
        roi = ev.out_dir / ref.folder / "roi" / f"{x['id']}.png"
        out_img = image_path(ev.out_dir / ref.folder, x["id"])
        tiles.append(_tile(viz.overlay(load_rgb(out_img), read_mask(roi)), side)
                     if roi.is_file() else PIL.Image.new("RGB", tiles[1].size, "white"))
        rows.append((f"{tag} {i}: L1 {x['l1']:.3f}, {x['id']}: \"{x['instruction']}\"", tiles))
    col_w = [max(r[1][j].width for r in rows) for j in range(len(heads))]
    head, text_h, pad = 16, 14, 4
    width = sum(col_w) + pad * (len(heads) + 1)
    sheet = PIL.Image.new("RGB", (width, head + len(rows) * (side + text_h + pad)), "white")
    d = PIL.ImageDraw.Draw(sheet)
    x0 = pad
    for j, name in enumerate(heads):
        d.text((x0, 2), name[: max(4, col_w[j] // 6)], fill="black")
        x0 += col_w[j] + pad
    for r, (label, tiles) in enumerate(rows):
        y = head + r * (side + text_h + pad)
        d.text((pad, y), label[: width // 6], fill="black")
        x0 = pad
        for j, t in enumerate(tiles):
            sheet.paste(t, (x0, y + text_h))
            x0 += col_w[j] + pad
    sheet.save(path)
    return path


def write(ev: Evaluation, paper: bool = False, grid_rows: int = 4) -> dict[str, Path]:
    """Write samples.csv, summary.md, summary.json and grid.png into the evaluation's folder."""
    out = ev.out_dir
    paths = {"csv": write_csv(ev, out / "samples.csv")}
    (out / "summary.md").write_text(markdown(ev, paper), encoding="utf-8")
    paths["markdown"] = out / "summary.md"
    (out / "summary.json").write_text(json.dumps(summary_json(ev, paper), indent=1), encoding="utf-8")
    paths["json"] = out / "summary.json"
    g = grid(ev, out / "grid.png", grid_rows) if grid_rows > 0 else None
    if g is not None:
        paths["grid"] = g
    return paths
