"""Registers, local-memory spills and shared memory of the attention kernels compiled for a GPU target, without a
GPU: what each tile preset asks of a multiprocessor, before any device time is spent on timing it.

    python bench/kernel_resources.py                  # sm_90 (H100/H200), bf16, head size 128

Triton compiles each kernel for the target (its pointers and head size specialized as a real launch of the
11B's shapes would: 16-byte aligned, D, T and HQ divisible by 16), and the cubin's resource usage is read with
the cuobjdump that Triton ships. A kernel whose shared memory does not change with num_stages has no pipelined
loads. Programs per multiprocessor: the fewest of what the shared memory allows (228 KB on sm_90, of which the
driver reserves 1 KB a program), the registers (65,536, allocated 256 a warp: a thread's count rounded up to 8)
and the warps (64). These are compile-time facts of this machine's Triton; a GPU machine's (another version)
may compile differently.
Prints a table, then one JSON line; --out also writes it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import report  # noqa: E402

SHARED_PER_PROCESSOR = {90: 228 * 1024, 80: 164 * 1024, 89: 100 * 1024}
SHARED_RESERVED_PER_PROGRAM = 1024  # the driver's, per resident block
REGISTERS_PER_PROCESSOR = 65536
WARPS_PER_PROCESSOR = 64


def compile_resources(kernel, pointers: dict[str, str], constants: dict, warps: int, stages: int, capability: int):
    """(registers, local bytes, shared bytes) of `kernel` compiled for sm_`capability`: pointers maps the pointer
    arguments to Triton types ("*bf16"), constants the constexpr ones; the other arguments are int32, `scale`
    float32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else pointers.get(name, "fp32" if name == "scale" else "i32")
                 for name in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
               if name in pointers or name in ("D", "T", "HQ")}
    source = ASTSource(fn=kernel, signature=signature, attrs=aligned,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return registers, local, compiled.metadata.shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capability", type=int, default=90, help="compute capability (90: H100/H200)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--decode-rows", type=int, default=64, help="decoding's rows per block (G x n, at most 64)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    from fastjudge.kernels import decode_attention_triton as decode_kernels
    from fastjudge.kernels import mllama_cross_attention_triton as kernels
    from fastjudge.kernels.mllama_cross_attention import DECODE_TILE_PRESETS, TILE_PRESETS
    bf16, f32, i32, i8 = "*bf16", "*fp32", "*i32", "*i8"
    rows = dict(start_ptr=i32, end_ptr=i32, lo_ptr=i32, hi_ptr=i32)
    forward = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, o_ptr=bf16, lse_ptr=f32, **rows)
    dq = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, do_ptr=bf16, lse_ptr=f32, delta_ptr=f32, dq_ptr=bf16, **rows)
    dkv = {name: kind for name, kind in dq.items() if name != "dq_ptr"} | dict(dk_ptr=bf16, dv_ptr=bf16)
    decode = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, part_ptr=f32, stats_ptr=f32, start_ptr=i32, end_ptr=i32)
    shared_prefix = dict(q_ptr=bf16, k_ptr=bf16, v_ptr=bf16, part_ptr=f32, stats_ptr=f32, prompt_mask_ptr=i8,
                         index_ptr=i32)
    training = {"forward": (kernels.cross_attention_forward_kernel, forward),
                "dq": (kernels.cross_attention_dq_kernel, dq), "dkv": (kernels.cross_attention_dkv_kernel, dkv)}
    jobs = []  # (preset, kernel name, kernel, pointers, BLOCK_M, BLOCK_N, warps, stages)
    for preset, tiles in TILE_PRESETS.items():
        for name, (kernel, pointers) in training.items():
            jobs.append((preset, name, kernel, pointers, *tiles[name]))
    for preset, (block_n, warps, stages) in DECODE_TILE_PRESETS.items():
        jobs.append((preset, "decode", kernels.cross_attention_decode_kernel, decode, args.decode_rows, block_n,
                     warps, stages))
        jobs.append((preset, "shared-prefix decode", decode_kernels.shared_prefix_decode_kernel, shared_prefix,
                     args.decode_rows, block_n, warps, stages))
    shared_limit = SHARED_PER_PROCESSOR.get(args.capability, 228 * 1024)
    results = []
    for preset, name, kernel, pointers, block_m, block_n, warps, stages in jobs:
        constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, 1 << (args.head_dim - 1).bit_length()),
                         PRECISION="tf32")
        row = {"preset": preset, "kernel": name, "block_m": block_m, "block_n": block_n, "warps": warps,
               "stages": stages}
        try:
            registers, local, shared = compile_resources(kernel, pointers, constants, warps, stages, args.capability)
        except Exception as failure:  # out of shared memory for the target, say: reported, not fatal
            results.append(row | {"failed": repr(failure)[:300]})
            print(f"{preset} {name}: failed: {failure!r}"[:300], flush=True)
            continue
        by_registers = REGISTERS_PER_PROCESSOR // (-(-registers // 8) * 8 * 32 * warps)
        by_shared = shared_limit // (shared + SHARED_RESERVED_PER_PROGRAM)
        results.append(row | {"registers": registers, "local_bytes": local, "shared_bytes": shared,
                              "programs_per_processor": min(by_registers, by_shared, WARPS_PER_PROCESSOR // warps)})
    print(f"sm_{args.capability}, bf16, head size {args.head_dim}; decoding rows per block {args.decode_rows}")
    print(f"{'preset':<15}{'kernel':<22}{'tiles (M x N, warps, stages)':>30}{'regs':>6}{'local B':>9}"
          f"{'shared B':>10}{'per SM':>8}")
    for r in results:
        tiles = f"{r['block_m']} x {r['block_n']}, {r['warps']}, {r['stages']}"
        if "failed" in r:
            print(f"{r['preset']:<15}{r['kernel']:<22}{tiles:>30}  failed")
        else:
            print(f"{r['preset']:<15}{r['kernel']:<22}{tiles:>30}{r['registers']:>6}{r['local_bytes']:>9}"
                  f"{r['shared_bytes']:>10}{r['programs_per_processor']:>8}")
    import triton
    report({"bench": "kernel_resources", "capability": args.capability, "head_dim": args.head_dim,
            "triton": triton.__version__, "results": results}, args.out)


if __name__ == "__main__":
    main()
