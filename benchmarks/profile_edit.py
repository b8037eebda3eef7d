"""Where an edit's time goes: per-stage times, the busiest CUDA kernels, GPU idle time and host syncs.

    python benchmarks/profile_edit.py --json profile.json          # GPU: full-size replica, 512 x 512, fp16
    python benchmarks/profile_edit.py --tiny                         # CPU dry run: tiny model, 128 x 128

For one automatic-RoI edit and one user-mask edit (after a warm-up edit of each, so graphs, autotuning
and caches are ready), it reports:

* stages: encode, localize (the localization pass), segment (k-means + localization), edit (the edit
  pass), decode, and "host" = wall time minus the stages: preparation before the first stage and the
  one copy back plus result assembly after the last (``EditResult.timings``; CUDA events on a GPU);
* the UNet evaluations of the edit and their share of the wall time;
* on CUDA, from ``torch.profiler``: the 15 kernels with the most total time, the GPU's idle time
  between kernels within the edit, and kernel count;
* on CUDA, host-device synchronizations: ``torch.cuda.set_sync_debug_mode("warn")`` counts every
  synchronizing call, split by where it happened (inside the localization pass, inside the edit pass,
  elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch


from lime_fast import LimeEngine  # noqa: E402
from lime_fast.demo import shapes_image  # noqa: E402

INSTRUCTION = "make the red circle blue"


def _engine(tiny: bool):
    from lime_fast.testing.tiny import replica_pipeline, tiny_pipeline

    cuda = torch.cuda.is_available()
    pipe = (tiny_pipeline() if tiny else replica_pipeline(device="cuda" if cuda else None)).to("cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32)
    return LimeEngine.from_pipe(pipe), (128 if tiny else 512)


class _Phases:
    """Labels the current phase (inside which pass) so sync warnings can be attributed to it."""

    def __init__(self, engine):
        self.now = "other"
        for name, label in (("_localize_pass", "localization pass"), ("_edit_pass", "edit pass")):
            original = getattr(engine, name)

            def wrapped(*a, _o=original, _l=label, **kw):
                self.now = _l
                try:
                    return _o(*a, **kw)
                finally:
                    self.now = "other"

            setattr(engine, name, wrapped)


def _syncs(phases, run) -> dict:
    """Host-device synchronizations during ``run()``, by phase (CUDA only)."""
    if not torch.cuda.is_available():
        return {}
    counts: Counter = Counter()

    def tally(message, category, *a, **k):
        if "synchroniz" in str(message).lower():
            counts[phases.now] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = tally
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"total": sum(counts.values()), **dict(counts)}


def _profile(run) -> dict:
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    # device activity only: host-side events of a 41-evaluation edit made the trace's post-processing
    # outlast a 90 s device step (H200, 2026-12-04); host time comes from the wall clock instead
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    by_name: Counter = Counter()
    calls: Counter = Counter()
    for e in kernels:
        by_name[e.name] += e.device_time_total
        calls[e.name] += 1
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    idle, busy_end = 0.0, None
    for start, end in spans:
        if busy_end is not None and start > busy_end:
            idle += start - busy_end
        busy_end = end if busy_end is None else max(busy_end, end)
    window = (spans[-1][1] - spans[0][0]) if spans else 0.0
    return {
        "kernels": len(kernels),
        "gpu_window_ms": round(window / 1e3, 3),
        "gpu_idle_ms": round(idle / 1e3, 3),
        "top_kernels": [{"name": n[:120], "total_ms": round(t / 1e3, 3), "calls": calls[n]} for n, t in by_name.most_common(15)],
    }


def _say(what: str, t0: float) -> None:
    """A progress line: on 2026-12-04 this script outlasted its 90 s device step twice (H200) with nothing
    printed, so each phase now reports when it ends and a cut run shows where the time went."""
    print(f"  [{time.perf_counter() - t0:6.1f} s] {what}", flush=True)


def measure(engine, image, mask, repeats: int = 3, phases=("syncs",), out: dict | None = None,
            save=lambda: None) -> dict:
    """Fills ``out`` (returned) phase by phase (timings, then the sync count), calling ``save()`` after
    each: a run stopped in a later phase keeps the earlier ones. The kernel profile is ``_profile``."""
    kw = dict(progress=False, mask=mask)
    began = time.perf_counter()
    engine.edit(image, INSTRUCTION, **kw)  # warm-up: graphs, autotuning, caches
    _say("warm-up edit (graph capture)", began)
    walls, results = [], []
    for _ in range(repeats):
        evals0 = engine.unet_evals
        t0 = time.perf_counter()
        r = engine.edit(image, INSTRUCTION, **kw)
        walls.append(time.perf_counter() - t0)
        results.append((r, engine.unet_evals - evals0))
    best = int(np.argmin(walls))
    r, evals = results[best]
    stages = {k: round(v, 5) for k, v in r.timings.items() if k != "total"}
    wall = walls[best]
    out = {} if out is None else out
    out.update(wall_s=round(wall, 5), stages_s=stages, host_s=round(wall - sum(stages.values()), 5),
               unet_evals=evals, syncs={}, profile={})
    save()
    _say(f"{repeats} timed edits: best {wall * 1e3:.1f} ms", began)
    if "syncs" in phases:
        out["syncs"] = _syncs(_Phases(engine), lambda: engine.edit(image, INSTRUCTION, **kw))
        save()
        _say(f"host syncs counted: {out['syncs']}", began)
    return out


def table(report: dict) -> list[str]:
    lines = ["| edit | wall | encode | localize | segment | edit pass | decode | host | UNet evals | syncs (loc / edit / other) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in report["edits"].items():
        s = m["stages_s"]
        sy = m["syncs"]
        sync_text = f"{sy.get('localization pass', 0)} / {sy.get('edit pass', 0)} / {sy.get('other', 0)}" if sy else "n/a (CPU)"
        lines.append(f"| {name} | {m['wall_s'] * 1e3:.1f} ms | " + " | ".join(
            f"{s.get(k, 0) * 1e3:.1f}" for k in ("encode", "localize", "segment", "edit", "decode"))
            + f" | {m['host_s'] * 1e3:.1f} | {m['unet_evals']} | {sync_text} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--tiny", action="store_true", help="the tiny model at 128 x 128 (CPU dry run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["syncs", "kernels"],
                    help="leave out the sync count or the kernel profile (torch.profiler)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if torch.cuda.is_available() and "kernels" not in args.skip:
        # The profiler started once before any CUDA graph is recorded: profiling replays of graphs
        # recorded before the profiler's first start has hung or crashed in torch (pytorch#75504,
        # pytorch#135003), a candidate cause of the two stalls on the H200 (2026-12-04).
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]):
            pass
    engine, size = _engine(args.tiny or not torch.cuda.is_available())
    _say("model built", t0)
    image = shapes_image(size)
    mask = np.zeros((size, size), bool)
    mask[size // 8 : size // 2, size // 8 : size // 2] = True
    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "model": "tiny random" if args.tiny or not torch.cuda.is_available() else "full-size random SD 1.5 replica",
        "size": size,
        "edits": {},
    }
    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    edits = (("automatic RoI", None), ("user mask", mask))
    for name, m in edits:
        measure(engine, image, m, args.repeats, phases=[p for p in ("syncs",) if p not in args.skip],
                out=report["edits"].setdefault(name, {}), save=save)
        print(table({"edits": {name: report["edits"][name]}})[-1], flush=True)  # as soon as it is measured
    if "kernels" not in args.skip:  # last, for both edits: a stalled profiler loses only its own tables
        for name, m in edits:
            report["edits"][name]["profile"] = _profile(lambda: engine.edit(image, INSTRUCTION, progress=False, mask=m))
            save()
            _say(f"kernel profile: {name}", t0)
    print("\n".join(table(report)))
    for name, m in report["edits"].items():
        for k in m["profile"].get("top_kernels", [])[:15]:
            print(f"  {name}: {k['total_ms']:8.3f} ms  x{k['calls']:<5} {k['name']}")
        if m["profile"]:
            print(f"  {name}: GPU idle {m['profile']['gpu_idle_ms']} ms of {m['profile']['gpu_window_ms']} ms, "
                  f"{m['profile']['kernels']} kernels")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
