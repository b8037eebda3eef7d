"""Compile the fused attention kernel ahead of time for a GPU architecture, without a GPU.

For each SD 1.5 cross-attention shape (with and without the RoI penalty, with and without the
head-mean capture, the heads-per-program variants and the split head dim) this prints the registers and spill bytes
ptxas reports, and a digest of the kernel's Triton GPU IR with names, source locations and layout
numbering taken out. Two uses:

* register pressure and spills of a kernel change, read on a CPU machine before any GPU time;
* a refactor of the kernel's source that should not change the generated code: run it before and
  after (``--digest-only``) and compare; equal digests mean the same operations and layouts.

    python scripts/kernel_codegen.py                 # sm_90a (H100 / H200)
    python scripts/kernel_codegen.py --arch 80 --json out.json

Needs only the triton wheel (it carries ptxas). Do not set TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

from lime_fast.kernels import regularized_attention as ra

# SD 1.5 at 512 x 512: (N query tokens, head dim) per UNet level; CLIP's T = 77 keys.
SHAPES = ((4096, 40), (1024, 80), (256, 160), (64, 160))
T_TEXT = 77
_POINTERS = {"ROI": "*u8", "KEEP": "*u8", "CAPTURE": "*i64", "PROBS": "*fp32"}


@dataclass
class Variant:
    N: int
    D: int
    T: int
    mask: bool
    capture: bool
    heads: int
    split: bool = False  # the head dim as two slices (ra._split_head_dim)
    registers: int = -1
    spill_bytes: int = -1
    digest: str = ""


def _signature(dtype: str) -> dict:
    fn = ra._regularized_attention_fwd
    sig = {}
    for name, param in zip(fn.arg_names, fn.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "OUT"):
            sig[name] = f"*{dtype}"
        elif name in _POINTERS:
            sig[name] = _POINTERS[name]
        else:
            sig[name] = "fp32" if name == "scale_log2" else "i32"
    return sig


def ir_digest(ttgir: str) -> str:
    """Digest of Triton GPU IR that ignores value names, source locations and the numbering of
    layouts (a moved line or a renamed local changes none of them)."""
    text = re.sub(r"loc\((?:[^()]|\([^()]*\))*\)", "", ttgir)
    text = re.sub(r"%[\w.]+", "%", text)
    text = re.sub(r"#(blocked|mma|shared|linear|slice)\d*", r"#\1", text)
    lines = sorted(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#loc"))
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


def compile_variant(v: Variant, arch: int = 90, dtype: torch.dtype = torch.float16, digest_only: bool = False) -> Variant:
    """Fill in ``v``'s registers, spills and IR digest, using the launcher's own default config."""
    cfg = ra._pick_config(v.N, v.T, v.D, v.capture, dtype)
    if v.heads > 1:
        cfg["HEADS"] = v.heads
    if v.split:
        cfg["BLOCK_D"], cfg["BLOCK_D2"] = ra._split_head_dim(v.D)
    meta = ra.kernel_constexprs(cfg, v.N, v.T, v.D, dtype, v.mask, v.capture)
    src = triton.compiler.ASTSource(fn=ra._regularized_attention_fwd,
                                    signature=_signature({torch.float16: "fp16", torch.bfloat16: "bf16",
                                                          torch.float32: "fp32"}[dtype]),
                                    constexprs=meta)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    v.digest = ir_digest(kernel.asm["ttgir"])
    if not digest_only:
        v.registers, v.spill_bytes = _ptxas_report(kernel.asm["ptx"], arch)
    return v


def variants(shapes=SHAPES) -> list[Variant]:
    out = []
    for N, D in shapes:
        out += [Variant(N, D, T_TEXT, mask, capture, 1) for mask in (False, True) for capture in (False, True)]
        out += [Variant(N, D, T_TEXT, True, False, heads) for heads in (2, 4)]
        if ra._split_head_dim(D):
            out += [Variant(N, D, T_TEXT, True, capture, 1, split=True) for capture in (False, True)]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: sm_90a)")
    parser.add_argument("--digest-only", action="store_true", help="skip ptxas; print IR digests only")
    parser.add_argument("--shapes", default=",".join(f"{n}:{d}" for n, d in SHAPES),
                        help="N:D query tokens and head dim, comma-separated (default: SD 1.5's four)")
    parser.add_argument("--json", help="also write the table to this file")
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in item.split(":")) for item in args.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes: expected N:D pairs like 4096:40,1024:80, got {args.shapes!r}")
    rows = []
    print(f"{'N':>5} {'D':>4} {'T':>3} {'mask':>5} {'capture':>7} {'heads':>5} {'split':>5} {'regs':>5} {'spill B':>7}  digest")
    for v in variants(shapes):
        compile_variant(v, args.arch, digest_only=args.digest_only)
        rows.append(asdict(v))
        print(f"{v.N:>5} {v.D:>4} {v.T:>3} {v.mask!s:>5} {v.capture!s:>7} {v.heads:>5} {v.split!s:>5} {v.registers:>5} "
              f"{v.spill_bytes:>7}  {v.digest}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
