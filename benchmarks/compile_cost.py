"""What compiling costs: the first automatic edit in a cold process and in a warm one (PyTorch's on-disk caches).

    python benchmarks/compile_cost.py                         # GPU: replica 512 x 512 fp16, compile=True
    python benchmarks/compile_cost.py --compile max-autotune-no-cudagraphs --json cost.json
    python benchmarks/compile_cost.py --tiny --compile aot_eager  # CPU dry run of the machinery

The parent process makes a fresh cache folder and runs the same child twice: the first child compiles
from scratch (cold), the second finds the first one's artifacts on disk (warm), as a second server
process or a restarted one would. Each child builds the model, makes the engine, times its first
automatic edit (dynamo tracing + inductor code generation or cache loading + Triton compilation or
loading + CUDA-graph capture) and then a steady edit, and reports both; compile cost = first - steady.

PyTorch caches relied on (set explicitly for the children; both caches are on by default in torch 2.13):
  TORCHINDUCTOR_CACHE_DIR       where inductor keeps everything below (default /tmp/torchinductor_$USER,
                                lost with the machine: point it at persistent storage in production)
  TORCHINDUCTOR_FX_GRAPH_CACHE=1  inductor's compiled-graph cache (torch._inductor.config.fx_graph_cache)
  TORCHINDUCTOR_AUTOGRAD_CACHE=1  AOTAutograd's cache (torch._functorch.config.enable_autograd_cache)
  Triton's kernel binaries and max-autotune's choices live under the same folder (inductor sets
  TRITON_CACHE_DIR there; torch._inductor.config.autotune_local_cache).
Dynamo's tracing itself is not cached: a warm process still traces each graph (seconds, not minutes).
To carry caches to another machine: ``torch.compiler.save_cache_artifacts()`` after warming up, and
``torch.compiler.load_cache_artifacts(blob)`` before the first edit there ("mega-cache").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args) -> dict:
    import torch

    from lime_fast import LimeEngine
    from lime_fast.demo import shapes_image
    from lime_fast.testing.tiny import replica_pipeline, tiny_pipeline

    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    pipe = (tiny_pipeline() if args.tiny else replica_pipeline(device="cuda" if cuda else None)).to("cuda" if cuda else "cpu",
                                                                     torch.float16 if cuda else torch.float32)
    build = time.perf_counter() - t0
    compile_opt = {"true": True}.get(args.compile.lower(), args.compile)
    engine = LimeEngine.from_pipe(pipe, compile=compile_opt, **({"precision": args.precision} if args.precision else {}))
    image = shapes_image(128 if args.tiny else 512)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        engine.edit(image, "make the red circle blue", steps=args.steps, progress=False)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"build_s": build, "first_edit_s": times[0], "steady_edit_s": times[1], "compile_s": times[0] - times[1]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", default="true", help="the engine's compile option (default true: inductor)")
    ap.add_argument("--precision", default=None, help="also precision=fp8")
    ap.add_argument("--tiny", action="store_true", help="the tiny model at 128 x 128 (CPU dry run)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cache-dir", help="cache folder (default: a fresh temporary one, so the first run is cold)")
    ap.add_argument("--runs", nargs="+", default=["cold", "warm"], choices=["cold", "warm"],
                    help="which processes to run (default both; the device check runs cold only and takes the warm "
                         "figure from the compiled modes' first edits, which reuse the same cache folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.tiny:  # the replica's inductor compile on 2 CPU cores: hours
        print("no CUDA: CPU dry run (--tiny --compile eager)")
        args.tiny, args.compile = True, "eager"
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="lime-inductor-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", "--compile", args.compile, "--steps", str(args.steps)]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--precision", args.precision] if args.precision else []
    out = {"compile": args.compile, "precision": args.precision, "cache_dir": str(cache)}
    for run in args.runs:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            print(done.stdout[-3000:] + done.stderr[-3000:])
            out[run] = {"error": f"exit {done.returncode}"}
            break
        out[run] = json.loads(line[len("RESULT "):])
    print("== ratios (measured side by side in this run) ==")  # the banner device_check.py collects after
    print(f"compile cost (compile={args.compile}{', precision=' + args.precision if args.precision else ''}, "
          f"{'tiny model 128x128' if args.tiny else 'SD 1.5 replica 512x512'}, {args.steps} steps):")
    for run in args.runs:
        r = out.get(run, {})
        if "first_edit_s" in r:
            print(f"  {run}: first automatic edit {r['first_edit_s']:.1f} s, steady {r['steady_edit_s']:.3f} s, "
                  f"compile + capture {r['compile_s']:.1f} s (model build {r['build_s']:.1f} s)")
        elif r:
            print(f"  {run}: {r['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all("error" not in out.get(r, {"error": 1}) for r in args.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
