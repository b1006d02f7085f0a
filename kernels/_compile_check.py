"""Ahead-of-time compile of every beit_fast Triton kernel for a GPU that need not be present.

Usage (TRITON_INTERPRET must be 0 in this process, so that ``@triton.jit`` gives real JITFunctions):

    TRITON_INTERPRET=0 python -m beit_fast.kernels._compile_check --capability 90 [--json out.json]

For each kernel at the configurations the launchers actually use at BEiT shapes (B=256, 224x224, P=16,
D = 768 / 1024, V = 8192; fp16 and bf16), it builds the launch arguments with the launchers' own
argument builders (on meta tensors), derives the signature / specialisation exactly like Triton's
runtime does, compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and
reports the shared memory, facts from the PTX (wgmma / mma.sync present, vector width of the
global->shared copies), the registers and stack frame (spills) from the cubin and the compile time.
tests/test_kernel_compile.py checks these.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time


def _build_source(kernel, args, constexprs):
    import torch
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    type_of = {
        torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
        torch.uint8: "u8", torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.bool: "i1",
    }
    names = kernel.arg_names
    n_pos = len(names) - len(constexprs)
    if len(args) != n_pos:
        raise ValueError(f"{kernel.__name__}: {len(args)} positional args for {n_pos} runtime parameters")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        val = args[i]
        if isinstance(val, torch.Tensor):
            signature[name] = "*" + type_of[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif val is None:
            signature[name] = "constexpr"
            consts[name] = None
        else:
            ty, spec = native_specialize_impl(BaseBackend, val, False, True, True)
            if ty == "constexpr":
                signature[name] = "constexpr"
                consts[name] = spec
            else:
                signature[name] = ty
                if spec == "D":
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(kernel, signature, consts, attrs)


def _cp_async_widths(ptx: str) -> list[int]:
    """Byte widths of the global->shared asynchronous copies (16 = fully vectorised)."""
    pat = r"cp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    return sorted({int(w, 0) for w in re.findall(pat, ptx)})


def specs(capability: int):
    """(name, dtype, launch-spec) for every kernel configuration used at BEiT shapes."""
    import torch

    from beit_fast.kernels import cross_entropy as ce
    from beit_fast.kernels import patch_embed as pe

    num_sms = 132 if capability >= 90 else 108
    meta = torch.device("meta")
    out = []
    for dtype in (torch.float16, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        for D in (768, 1024):
            B, C, H, W, P = 256, 3, 224, 224, 16
            N = (H // P) * (W // P)
            M, K = B * N, C * P * P
            px = torch.empty((B, C, H, W), dtype=dtype, device=meta)
            w2 = torch.empty((D, K), dtype=dtype, device=meta)
            vec = torch.empty((D,), dtype=dtype, device=meta)
            mask = torch.empty((M,), dtype=torch.uint8, device=meta)
            o = torch.empty((M, D), dtype=dtype, device=meta)
            out.append((f"pe_fwd[D={D}]", dn, pe.fwd_launch(px, w2, vec, vec, mask, o, P, False)))
            out.append((f"pe_fwd_nomask[D={D}]", dn, pe.fwd_launch(px, w2, vec, vec, None, o, P, False)))
            split, rps = pe.params_split(M, D, K, True, False, num_sms=num_sms)
            dw = torch.empty((split, D, K), dtype=torch.float32, device=meta)
            dv = torch.empty((split, D), dtype=torch.float32, device=meta)
            out.append((f"pe_bwd_params[D={D}]", dn,
                        pe.bwd_params_launch(o, px, mask, dw, dv, dv, P, True, True, True, split, rps, False)))
            out.append((f"pe_bwd_pixels[D={D}]", dn, pe.bwd_pixels_launch(o, w2, mask, px, P, False)))
        V, R = 8192, ce.chunk_rows(256 * 75, 8192, 2)
        lg = torch.empty((R, V), dtype=dtype, device=meta)
        lab = torch.empty((R,), dtype=torch.int64, device=meta)
        f32 = torch.empty((R,), dtype=torch.float32, device=meta)
        out.append((f"ce_rows_train[V={V}]", dn, ce.rows_launch(lg, lab, f32, f32, None, -100, True, False)))
        out.append((f"ce_rows_nograd[V={V}]", dn, ce.rows_launch(lg, lab, f32, f32, None, -100, False, False)))
        out.append((f"ce_rows_none_bwd[V={V}]", dn, ce.rows_launch(lg, lab, f32, f32, f32, -100, True, False)))
    return out + attention_specs(capability)


def attention_specs(capability: int):
    """The attention kernels at BEiT-B shapes (H 12, Dh 64, bf16; N 197 at 224 with B 256, N 577 at 384
    with B 64): every configuration the autotuner may pick on this architecture family and the
    deterministic ones, with the relative-position table (the model's path) and with a dense [H, N, N]
    bias (the HF / timm patches' path). (N enters only as a runtime size: both N compile to the same code,
    the second one comes from Triton's cache.)"""
    import torch

    from beit_fast.kernels import attention as at

    fam = at.arch_family(capability // 10)
    num_sms = 132 if capability >= 90 else 108
    meta = torch.device("meta")
    dtype, dn = torch.bfloat16, "bfloat16"
    out = []

    def tag(d):
        return ",".join(f"{k}={v}" for k, v in d.items())

    def unique(cfgs):
        return [c for i, c in enumerate(cfgs) if c not in cfgs[:i]]

    fwd = unique(at.configs_for(at.GPU_FWD_CONFIGS, fam) + [at.DETERMINISTIC_FWD])
    dq = unique(at.configs_for(at.GPU_DQ_CONFIGS, fam) + [at.DETERMINISTIC_DQ])
    dkdv = unique(at.configs_for(at.GPU_DKDV_CONFIGS, fam) + [at.DETERMINISTIC_DKDV])
    table_grad = unique(at.configs_for(at.GPU_TABLE_GRAD_CONFIGS, fam) + [at.DETERMINISTIC_TABLE_GRAD])
    for N, B, T in ((197, 256, 732), (577, 64, 2212)):
        H, D = 12, 64
        q = torch.empty((B, N, 3, H, D), dtype=dtype, device=meta).permute(2, 0, 3, 1, 4)[0]  # the model's views
        o = torch.empty_strided((B, H, N, D), at.out_strides(B, H, N, D), dtype=dtype, device=meta)
        g = torch.empty((B, H, N, D), dtype=dtype, device=meta)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=meta)
        table_t = torch.empty((H, T), dtype=torch.float32, device=meta)
        index = torch.empty((N, N), dtype=torch.int16, device=meta)
        dense = torch.empty((1, H, N, N), dtype=torch.float32, device=meta)
        groups, per = at.batch_groups(B, H, N, False, num_sms=num_sms)
        part = torch.empty((groups, H, N, N), dtype=torch.float32, device=meta)
        for mode, b4, tb, ix in (("table", None, table_t, index), ("dense", dense, None, None)):
            for c in fwd:
                out.append((f"attn_fwd[{mode},N={N},{tag(c)}]", dn,
                            at.fwd_launch(q, q, q, o, lse, b4, tb, ix, 0.125, False, c)))
            for c in dq:
                out.append((f"attn_bwd_dq[{mode},N={N},{tag(c)}]", dn,
                            at.dq_launch(q, q, q, o, g, lse, lse, g, part, b4, tb, ix, 0.125, groups, per, True,
                                         False, c)))
            for c in dkdv:
                out.append((f"attn_bwd_dkdv[{mode},N={N},{tag(c)}]", dn,
                            at.dkdv_launch(q, q, q, g, lse, lse, g, g, b4, tb, ix, 0.125, False, c)))
        positions = torch.empty((T, N - 1), dtype=torch.int32, device=meta)
        dtable = torch.empty((T, H), dtype=torch.float32, device=meta)
        for c in table_grad:
            out.append((f"attn_table_grad[N={N},{tag(c)}]", "float32",
                        at.table_grad_launch(part, positions, dtable, False, c)))
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in ``cubin``, from Triton's bundled cuobjdump. A stack
    frame is where ptxas puts register spills (these kernels have no local arrays)."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return int(m.group(1)), int(m.group(2))


def run(capability: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    from beit_fast.kernels._common import jit_function_of

    target = GPUTarget("cuda", capability, 32)
    results = []
    for name, dtype, (kernel, grid, args, constexprs, opts) in specs(capability):
        t0 = time.time()
        src = _build_source(jit_function_of(kernel), args, constexprs)
        compiled = triton.compile(src, target=target, options=dict(opts))
        ptx = compiled.asm["ptx"]
        regs, stack = _resource_usage(compiled.asm["cubin"])
        results.append(dict(
            name=name, dtype=dtype, capability=capability, kernel=kernel.__name__,
            registers=regs, stack_bytes=stack,
            shared=int(compiled.metadata.shared),
            num_warps=opts["num_warps"], num_stages=opts["num_stages"],
            ptx_target=(re.search(r"\.target\s+(\S+)", ptx) or [None, None])[1],
            has_wgmma="wgmma" in ptx,
            has_mma_sync="mma.sync" in ptx,
            cp_async_widths=_cp_async_widths(ptx),
            has_cubin=bool(compiled.asm.get("cubin")),
            seconds=round(time.time() - t0, 2),
        ))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--capability", type=int, required=True)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    res = run(a.capability)
    text = json.dumps(res, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
