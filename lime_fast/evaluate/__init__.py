"""``lime-fast eval``: the LIME paper's MagicBrush evaluation (single- and multi-turn; L1, L2, CLIP-I,
CLIP-T, DINO), on MagicBrush's test release, its Hugging Face parquet files, or a JSONL manifest with
targets.

    lime-fast eval MagicBrush/test --out eval/ --model timbrooks/instruct-pix2pix \\
        --clip ./clip-vit-base-patch32 --dino ./dino-vits16

    from lime_fast import evaluate
    data = evaluate.load("MagicBrush/test", "eval/")
    ev = evaluate.evaluate(data, "eval/", model="timbrooks/instruct-pix2pix", clip="./clip-vit-base-patch32")
    evaluate.report.write(ev)
    ev.summary["single"]["lime"]["l1"]

Modules: ``datasets`` (the layouts, read into ``Session`` / ``Turn``), ``metrics`` (as MagicBrush's
official ``evaluation/image_eval.py`` computes them), ``run`` (methods, the resumable runner on the batch
runner's store, scoring), ``report`` (CSV, Markdown, JSON, picture grid), ``cli``.
"""

from . import report
from .datasets import Dataset, DatasetError, Session, Turn, load, read_eval_manifest, read_magicbrush, read_mask, read_parquet
from .run import METHODS, SETTINGS, EvalError, Evaluation, Method, evaluate, out_id, parse_method

__all__ = [
    "Dataset", "DatasetError", "EvalError", "Evaluation", "METHODS", "Method", "SETTINGS", "Session", "Turn",
    "evaluate", "load", "out_id", "parse_method", "read_eval_manifest", "read_magicbrush", "read_mask",
    "read_parquet", "report",
]
