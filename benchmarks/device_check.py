"""The one GPU check: correctness of every fast path on the device, then every benchmark, one report.

Run it as the first device call of any task that has a GPU, and paste its report (it names the GPU
and the date) into benchmarks/RESULTS.md:

    bash scripts/device_check.sh first 440     # on the device: wheels, then --plan first within 440 s

``--plan`` picks the steps and their order (``PLANS``: "first" fits a first call of a 15-minute lease,
"second" the faster modes after it, "all" everything); ``--only`` narrows a plan.

Steps (each a subprocess with its own time limit, so one slow or failing step does not hide the
others; ``STEPS`` lists them and ``PLANS`` orders them):
  - tests on the device: the kernel against its reference (fp16, fp32 and bf16 on a real GPU), the
    engine end to end through the kernel, whole-pass CUDA graphs, the native segmentation; the faster
    modes' device tests (FP8, compile, channels-last, step caching through real CUDA graphs, SDXL);
  - profile_edit.py: where one automatic and one user-mask edit spend their time (stages, host
    time, top CUDA kernels, GPU idle time, host syncs inside each pass) on the full-size replica;
  - bench_attention.py: the kernel vs SDPA, SDPA + float mask, FlexAttention, the release's pattern;
  - bench_edit.py: diffusers vs lime_fast on the full-size random-weight replica, 512 x 512 fp16;
    bench_sdxl.py: the same for the SDXL InstructPix2Pix replica (1024, or 768 and 1024);
  - bench_segment.py: native vs materialized at 512 x 512; bench_batch.py: the batch runner;
    bench_refine.py: ``EditResult.refine`` against the automatic edit it redoes (shapes-ip2p);
  - the faster modes: ``bench_edit.py::test_mode`` for the modes without compilation (speed and
    fidelity against the faithful path, see benchmarks/modes.py), the cold compile cost
    (compile_cost.py), then the compiled modes, which find the compile-cost step's artifacts in the
    same inductor cache folder (TORCHINDUCTOR_CACHE_DIR, fresh per run).
The report holds each step's status and time and the ratio lines the benchmarks print.

On a machine without CUDA it runs the same steps (the GPU benchmarks skip themselves), which is how
it is smoke-tested here. The device image lacks diffusers, pytest-benchmark and open_clip_torch:
``bash scripts/device_wheels.sh`` downloads them as wheels into .whl/ (see CONTRIBUTING.md).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One entry per step: (name, command, time limit in seconds, extra environment). A pytest step is a list of
# pytest arguments; a script step starts with a benchmarks/*.py that is not a bench_/test_ file.
STEPS = {
    "tests": ("tests: kernel, engine through the kernel, CUDA graphs, segmentation",
              ["tests/test_regularized_attention.py", "tests/test_engine_triton.py", "tests/test_graphs.py",
               "tests/test_segment.py", "-q", "--maxfail=5"], 150),
    "tests_modes": ("modes: device tests (fp8, compile, channels-last, step caching, SDXL)",
                    ["tests/test_speedups.py", "tests/test_stepcache.py", "tests/test_sdxl.py", "-q", "-k", "device or cuda"], 150),
    "profile": ("profile_edit", ["benchmarks/profile_edit.py"], 150),
    "attention": ("bench_attention", ["benchmarks/bench_attention.py", "--benchmark-only", "-q"], 180),
    # every whole-edit row of bench_edit but the faster modes (below), the release estimate and graphs-off
    "edit": ("bench_edit", ["benchmarks/bench_edit.py", "--benchmark-only", "-q", "-k",
                            "not test_mode and not release and not auto_roi_eager"], 130),
    "edit_slow": ("bench_edit: release estimate, graphs off", ["benchmarks/bench_edit.py", "--benchmark-only", "-q", "-k",
                                                               "release or auto_roi_eager or diffusers"], 150),
    "sdxl": ("bench_sdxl", ["benchmarks/bench_sdxl.py", "--benchmark-only", "-q"], 150),
    "sdxl1024": ("bench_sdxl at 1024", ["benchmarks/bench_sdxl.py", "--benchmark-only", "-q"], 130,
                 {"LIME_BENCH_SDXL_SIZES": "1024"}),
    "segment": ("bench_segment", ["benchmarks/bench_segment.py", "--benchmark-only", "-q"], 90),
    "batch_runner": ("bench_batch", ["benchmarks/bench_batch.py", "--benchmark-only", "-q"], 90),
    "refine": ("bench_refine: refine vs automatic edit (shapes-ip2p)", ["benchmarks/bench_refine.py", "--benchmark-only", "-q"], 90),
    # the faster modes, each mode's row printed as soon as it is done (a step cut short keeps them). The
    # compiled-modes step runs in a new process on the cache the compile-cost step filled: its "compile"
    # row's first edit is the warm-cache figure, compile_cost.py's the cold one.
    "modes_eager": ("modes: eager (faithful, kv_cache, fused_qkv, channels_last, stepcache2/3, fp8)",
                    ["benchmarks/bench_edit.py", "-k", "test_mode", "--benchmark-only", "-q", "-s"], 300,
                    {"LIME_BENCH_MODES": "GPU_EAGER"}),
    "compile_cost": ("modes: compile cost (cold process)", ["benchmarks/compile_cost.py", "--runs", "cold", "--cache-dir", "{cache}"], 300),
    "modes_compiled": ("modes: compiled (compile, fast, fastest, compile_fp8, compile_max, fp8_conv)",
                       ["benchmarks/bench_edit.py", "-k", "test_mode", "--benchmark-only", "-q", "-s"], 480,
                       {"LIME_BENCH_MODES": "GPU_COMPILED"}),
}

# Most valuable first: a lease is short, and --budget cuts the tail, not the head. A 15-minute lease holds
# a machine start (1-2 minutes), a first call of the "first" plan and a shorter second one.
PLANS = {
    "first": ["profile", "edit", "sdxl1024", "segment", "attention", "tests"],
    # the first plan again after fixes; the segment step times the graphed k-means beside the eager one
    "second": ["profile", "edit", "segment", "attention", "sdxl1024", "tests"],
    "modes": ["modes_eager", "tests_modes"],
    "compiled": ["compile_cost", "modes_compiled"],
    "all": ["tests", "profile", "attention", "edit", "edit_slow", "sdxl", "segment", "batch_runner", "refine", "tests_modes",
            "modes_eager", "compile_cost", "modes_compiled"],
}


def environment() -> list[str]:
    import torch

    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", f"python {platform.python_version()}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU: none (CPU smoke run: GPU benchmarks skip themselves)")
    for name in ("triton", "diffusers", "transformers", "torchao", "numpy"):
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name}: not installed")
    return lines


def ratio_lines(output: str) -> list[str]:
    """The lines under the benchmarks' 'ratios (measured side by side in this run)' banner."""
    lines, inside = [], False
    for line in output.splitlines():
        if "ratios (measured side by side" in line:
            inside = True
            continue
        if inside and (line.startswith("===") or line.startswith("---") and "benchmark" in line):
            inside = False
        if inside and line.strip():
            lines.append(line.rstrip())
    return lines


def run_step(args: list[str], limit: int, env: dict | None = None) -> tuple[str, float, str]:
    """Run a pytest step, or a script step (a benchmarks/*.py that is not a bench_ suite).

    A step that outlasts ``limit`` gets SIGABRT first: the child's faulthandler (PYTHONFAULTHANDLER, and
    pytest's own) prints every thread's Python stack to stderr, which lands in the log, so a stall shows
    where it stalled (profile_edit outlasted its step twice on 2026-12-04 with nothing to show why)."""
    t0 = time.perf_counter()
    script = not Path(args[0]).name.startswith(("bench_", "test_"))
    cmd = [sys.executable, *args] if script else [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})})
    try:
        out, err = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:  # (retrying communicate loses no output)
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        status = f"TIMEOUT after {limit} s"
        err += f"\n[device_check: SIGABRT at the {limit} s limit; the stacks above show where each thread was]\n"
    return status, time.perf_counter() - t0, out + err


def step_lines(out: str) -> list[str]:
    """What a step's report keeps: its ratio lines, else its faster-mode rows, and its pytest tally."""
    lines = ratio_lines(out) or [line for line in out.splitlines() if line.startswith("MODE |")]
    tally = [line for line in out.splitlines() if re.search(r"\b\d+ (passed|failed|errors?|skipped)\b", line)][-3:]
    return lines + tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", choices=sorted(PLANS), default="all", help="which steps, in which order (default all)")
    ap.add_argument("--only", nargs="+", help="of the plan's steps, run only those whose key or name contains one of these words")
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument("--log", help="append every step's full output to this one file")
    ap.add_argument("--json", help="write the results as JSON here too (environment, steps, their lines, the profile)")
    ap.add_argument("--budget", type=float, default=470.0,
                    help="seconds for all steps together (default 470); a step gets at most what is left")
    args = ap.parse_args(argv)
    start = time.perf_counter()

    import tempfile

    import modes as fast_modes  # a sibling: this script runs from benchmarks/

    # one fresh inductor cache folder per run: the compile-cost step starts cold, the compiled modes reuse it
    cache = tempfile.mkdtemp(prefix="lime-inductor-")
    import torch

    cuda = torch.cuda.is_available()
    report = ["# lime_fast device check", "", *[f"- {line}" for line in environment()], f"- plan: {args.plan}", ""]
    report += ["| step | status | seconds |", "|---|---|---|"]
    details, failed = [], 0
    record = {"environment": environment(), "plan": args.plan, "steps": []}
    for key in PLANS[args.plan]:
        name, step_args, limit, *step_env = STEPS[key]
        if args.only and not any(w in key or w in name for w in args.only):
            continue
        env = {"TORCHINDUCTOR_CACHE_DIR": cache}
        for k, v in (step_env[0] if step_env else {}).items():
            # a modes.py list name (GPU_EAGER; its CPU_ twin on a smoke run without CUDA), or a value
            env[k] = getattr(fast_modes, v if cuda else v.replace("GPU_", "CPU_"), v)
        step_args = [a.replace("{cache}", cache) for a in step_args]
        left = args.budget - (time.perf_counter() - start)
        if left < 20:
            report.append(f"| {name} | skipped: budget spent | 0 |")
            record["steps"].append({"key": key, "name": name, "status": "skipped: budget spent", "seconds": 0, "lines": []})
            continue
        print(f"== {name}", flush=True)
        profile_json = Path(tempfile.mkdtemp()) / "profile_edit.json" if key == "profile" else None
        if profile_json is not None:
            step_args = [*step_args, "--json", str(profile_json)]
        status, secs, out = run_step(step_args, int(min(limit, left)), env)
        if profile_json is not None and profile_json.is_file():
            record["profile_edit"] = json.loads(profile_json.read_text())
            details += ["### per-stage profile", "", *[line for line in out.splitlines() if line.startswith(("|", "  "))], ""]
        failed += status != "ok"
        report.append(f"| {name} | {status} | {secs:.0f} |")
        lines = step_lines(out)
        record["steps"].append({"key": key, "name": name, "status": status, "seconds": round(secs, 1), "lines": lines})
        details += [f"### {name}", "", "```", *(lines or ["(no ratio lines)"]), "```", ""]
        if args.log:
            with open(args.log, "a") as f:
                f.write(f"\n===== {name}: {status} in {secs:.0f} s\n{out}\n")
        print(f"   {status} in {secs:.0f} s", flush=True)
        if args.out:  # after every step, so a run cut short still leaves its report
            Path(args.out).write_text("\n".join(report + [""] + details))
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=1))
    text = "\n".join(report + [""] + details)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
