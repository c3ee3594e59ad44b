"""Compile the fused penalty's Triton kernels ahead of time for a CUDA target, on any machine (no
GPU needed), and report each specialisation's registers, spilled bytes and shared memory.

What is compiled is what the launchers in kernels/procon_projection.py would launch for hidden
size D: their block-size heuristics, every hidden dtype, every norm and flag combination, through
Triton's full pipeline to a cubin; Triton's own ptxas (shipped in the triton wheel) then reports
registers, stack frame and spill stores of the PTX (``ptxas -v``). It catches a kernel that no
longer compiles for the GPU, and register spills, before any GPU time is spent; registers per
thread also bound the occupancy (65536 registers per SM on sm_80/sm_90).

    python benchmarks/kernel_resources.py                         # sm_90 (H100/H200), D 64 576 4096
    python benchmarks/kernel_resources.py --arch 80 --d 2048 --dtypes bf16 --out resources.csv

TRITON_INTERPRET must be unset (interpreted kernels cannot be compiled). Exit status 1 when a
specialisation fails to compile or spills.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("kernel_resources: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastprocon.kernels import procon_projection as K  # noqa: E402
from fastprocon.penalty.ops import NORMS  # noqa: E402

HIDDEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
            torch.bool: "i1"}
FIELDS = ("triton", "arch", "kernel", "hidden_dtype", "D", "flags", "block_n", "block_d", "num_warps", "regs",
          "spill_bytes", "stack_bytes", "shared_bytes", "error")
_PTXAS_FIELDS = {   # ptxas -v line fragments -> row fields
    "regs": re.compile(r"Used (\d+) registers"), "spill_bytes": re.compile(r"(\d+) bytes spill stores"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame")}


class Case(NamedTuple):
    kernel: str
    hidden_dtype: str
    D: int
    flags: str                       # human-readable constexpr flags
    fn: object                       # the @triton.jit function
    pointers: dict                   # pointer argument -> torch dtype of what it points to
    constexprs: dict
    num_warps: int


def cases(d_values: list[int], dtype_names: list[str]) -> list[Case]:
    """Every distinct specialisation the launchers produce for these D and dtypes."""
    out, seen = [], set()
    for name in dtype_names:
        h = HIDDEN_DTYPES[name]
        acc_torch, acc_tl = K._acc_dtype(h)
        for d in d_values:
            bn, bd, warps = K._fwd_blocks(1 << 20, d, h)
            fwd_variants = [(norm, True, torch.bool, True, False) for norm in NORMS]        # training
            fwd_variants += [("l1", True, acc_torch, True, False), ("l1", False, None, False, False),  # float w; eval
                             ("huber", True, torch.bool, True, True)]   # learnable direction
            for norm, has_z0, w_dtype, need_grad, dir_grad in fwd_variants:
                flags = f"norm={norm} z0={int(has_z0)} w={TL_NAMES[w_dtype] if w_dtype else '-'} grad={int(need_grad)}"
                flags += " dir_grad=1" if dir_grad else ""
                out.append(Case("fwd", name, d, flags, K._procon_fwd_kernel,
                                dict(h_ptr=h, r_ptr=acc_torch, z0_ptr=acc_torch, w_ptr=w_dtype or acc_torch,
                                     z_ptr=acc_torch, coef_ptr=acc_torch, partial_ptr=acc_torch, hc_ptr=acc_torch,
                                     delta_ptr=acc_torch),
                                # the trainer gives the band's per-layer width as a 0-d tensor
                                dict(NORM=NORMS[norm], HAS_DELTA_PTR=norm == "band", HAS_Z0=has_z0,
                                     HAS_W=w_dtype is not None,
                                     NEED_GRAD=need_grad, NEED_DIR_GRAD=dir_grad, ACC_DTYPE=acc_tl, BLOCK_N=bn,
                                     BLOCK_D=bd), warps))
            bn, bd, warps = K._bwd_blocks(1 << 20, d)
            for has_gin in (False, True):
                out.append(Case("bwd", name, d, f"incoming_grad={int(has_gin)}", K._procon_bwd_kernel,
                                dict(coef_ptr=acc_torch, r_ptr=acc_torch, g_ptr=acc_torch, gin_ptr=h, out_ptr=h),
                                dict(HAS_GIN=has_gin, ROUND_BF16=False, ACC_DTYPE=acc_tl, BLOCK_N=bn, BLOCK_D=bd),
                                warps))
        out.append(Case("sum_partials", name, 0, "", K._sum_partials_kernel,
                        dict(partial_ptr=acc_torch, out_ptr=acc_torch), dict(ACC_DTYPE=acc_tl, BLOCK=1024), 4))
        bp, bd = K._sum_rows_blocks(1 << 20)
        out.append(Case("sum_rows", name, 0, "", K._sum_rows_kernel, dict(partial_ptr=acc_torch, out_ptr=acc_torch),
                        dict(ACC_DTYPE=acc_tl, BLOCK_P=bp, BLOCK_D=bd), 4))
    unique = []
    for c in out:   # D values that share block sizes give the same kernel: compile it once
        key = (c.kernel, c.hidden_dtype, c.flags, tuple(sorted(map(str, c.constexprs.items()))), c.num_warps)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def signature(case: Case) -> dict:
    """Triton signature: typed pointers, 32-bit ints (as Triton types Python ints below 2**31),
    fp32 floats, and the constexprs."""
    sig = {}
    for name in case.fn.arg_names:
        if name in case.constexprs:
            sig[name] = "constexpr"
        elif name in case.pointers:
            sig[name] = "*" + TL_NAMES[case.pointers[name]]
        else:
            sig[name] = "fp32" if name == "delta" else "i32"
    return sig


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill stores and stack frame (bytes) of the one kernel in ``ptx``, from the
    ptxas Triton itself compiles with, in verbose mode."""
    from triton.backends.nvidia import compiler as nvidia
    ptxas = nvidia.get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"   # Triton targets the "a" variants from sm_90
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    return {name: int(pattern.search(text).group(1)) for name, pattern in _PTXAS_FIELDS.items()}


def compile_case(case: Case, arch: int) -> dict:
    bn = case.constexprs.get("BLOCK_N", "")
    bd = case.constexprs.get("BLOCK_D", case.constexprs.get("BLOCK", ""))
    row = {"triton": triton.__version__, "arch": f"sm_{arch}", "kernel": case.kernel,
           "hidden_dtype": case.hidden_dtype, "D": case.D or "", "flags": case.flags,
           "block_n": bn, "block_d": bd, "num_warps": case.num_warps, "error": ""}
    names = case.fn.arg_names
    src = ASTSource(fn=case.fn, signature=signature(case),
                    constexprs={(names.index(k),): v for k, v in case.constexprs.items()})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": case.num_warps})
        row.update(ptxas_usage(compiled.asm["ptx"], arch), shared_bytes=compiled.metadata.shared)
    except Exception as e:  # noqa: BLE001  (reported per case, the run goes on)
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200, 80: A100)")
    p.add_argument("--d", type=int, nargs="+", default=[64, 576, 4096], help="hidden sizes D")
    p.add_argument("--dtypes", nargs="+", choices=list(HIDDEN_DTYPES), default=list(HIDDEN_DTYPES))
    p.add_argument("--out", type=Path, help="also write the table as CSV")
    args = p.parse_args(argv)
    rows = [compile_case(c, args.arch) for c in cases(args.d, args.dtypes)]
    print(f"Triton {triton.__version__}, target sm_{args.arch}")
    print(f"{'kernel':<13} {'dtype':<5} {'D':>5} {'flags':<40} {'block':>9} {'warps':>5} {'regs':>5} "
          f"{'spill':>6} {'smem':>6}")
    for r in rows:
        block = f"{r['block_n']}x{r['block_d']}" if r["block_n"] != "" else str(r["block_d"])
        tail = r["error"] or f"{r['regs']:>5} {r['spill_bytes']:>6} {r['shared_bytes']:>6}"
        print(f"{r['kernel']:<13} {r['hidden_dtype']:<5} {r['D']!s:>5} {r['flags']:<40} {block:>9} "
              f"{r['num_warps']:>5} {tail}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    bad = [r for r in rows if r["error"] or r["spill_bytes"]]
    if bad:
        print(f"{len(bad)} of {len(rows)} specialisations failed to compile or spill registers", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
