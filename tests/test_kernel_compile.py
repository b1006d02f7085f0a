"""Ahead-of-time compile of every Triton kernel for A100 (sm_80) and H100 (sm_90a), on a machine
without a GPU, at the configurations the launchers use at BEiT shapes (fp16 and bf16; D = 768 / 1024,
P = 16, V = 8192; attention: every autotuner configuration of the card's family and the deterministic
ones, bf16, H 12, Dh 64, N 197 and 577, relative-position table and dense bias; every table-gradient
configuration).

The root conftest runs this process under TRITON_INTERPRET=1, where ``@triton.jit`` objects are
interpreter wrappers that cannot be compiled; so each target is compiled in a fresh subprocess with
TRITON_INTERPRET=0 (``python -m beit_fast.kernels._compile_check``), both targets in parallel.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block: A100, H100
GEMM_KERNELS = ("_pe_fwd_kernel", "_pe_bwd_params_kernel", "_pe_bwd_pixels_kernel")
ALL_KERNELS = GEMM_KERNELS + ("_ce_rows_kernel",)
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, TRITON_INTERPRET="0")
    procs = {}
    for cap in (80, 90):
        path = out / f"sm{cap}.json"
        procs[cap] = (path, subprocess.Popen(
            [sys.executable, "-m", "beit_fast.kernels._compile_check", "--capability", str(cap), "--json", str(path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for cap, (path, p) in procs.items():
        _, err = p.communicate(timeout=900)  # minutes on a loaded 2-core machine
        assert p.returncode == 0, f"compile for capability {cap} failed:\n{err[-4000:]}"
        results[cap] = json.loads(path.read_text())
    return results


@pytest.mark.parametrize("cap", [80, 90])
def test_every_kernel_compiles_for_both_dtypes(compiled, cap):
    res = compiled[cap]
    seen = {(r["kernel"], r["dtype"]) for r in res}
    for k in ALL_KERNELS:
        for dt in ("float16", "bfloat16"):
            assert (k, dt) in seen, (k, dt)
    for r in res:
        assert r["has_cubin"], r
        assert r["ptx_target"] == ("sm_90a" if cap == 90 else "sm_80"), r


@pytest.mark.parametrize("cap", [80, 90])
def test_shared_memory_within_card_limit(compiled, cap):
    for r in compiled[cap]:
        assert 0 <= r["shared"] <= SHARED_LIMIT[cap], r


def test_sm90_gemms_use_wgmma(compiled):
    for r in compiled[90]:
        if r["kernel"] in GEMM_KERNELS:
            assert r["has_wgmma"], f"{r['name']} {r['dtype']}: no wgmma in the sm_90a PTX"


def test_sm80_gemms_use_tensor_cores(compiled):
    for r in compiled[80]:
        if r["kernel"] in GEMM_KERNELS:
            assert r["has_mma_sync"], f"{r['name']} {r['dtype']}: no mma.sync in the sm_80 PTX"


@pytest.mark.parametrize("cap", [80, 90])
def test_gemm_operand_copies_are_16_byte_vectors(compiled, cap):
    """The patch gather (pixels read straight from NCHW, no im2col) must still be 16-byte
    cp.async copies, like the weight tile."""
    for r in compiled[cap]:
        if r["kernel"] in GEMM_KERNELS:
            assert r["cp_async_widths"] == [16], r


@pytest.mark.parametrize("cap", [80, 90])
def test_attention_kernels_compile_at_beit_shapes(compiled, cap):
    from beit_fast.kernels import attention as at

    res = [r for r in compiled[cap] if r["kernel"] in ATTENTION_KERNELS + ("_table_grad_kernel",)]
    names = {r["name"] for r in res}
    fam = at.arch_family(cap // 10)
    for n in (197, 577):
        for mode in ("table", "dense"):
            for prefix, configs in (("attn_fwd", at.GPU_FWD_CONFIGS), ("attn_bwd_dq", at.GPU_DQ_CONFIGS),
                                    ("attn_bwd_dkdv", at.GPU_DKDV_CONFIGS)):
                for c in at.configs_for(configs, fam):
                    tag = ",".join(f"{k}={v}" for k, v in c.items())
                    assert f"{prefix}[{mode},N={n},{tag}]" in names, (prefix, mode, n, tag)
        for c in at.configs_for(at.GPU_TABLE_GRAD_CONFIGS, fam) + [at.DETERMINISTIC_TABLE_GRAD]:
            tag = ",".join(f"{k}={v}" for k, v in c.items())
            assert f"attn_table_grad[N={n},{tag}]" in names, (n, tag)
    for r in res:
        if r["kernel"] in ATTENTION_KERNELS:
            # wgmma takes 64 rows per warpgroup: a tile with fewer rows (the 32-row configurations that cut the
            # padding at N = 197) gets mma.sync, tensor cores still
            rows = int(re.search(r"BLOCK_N=(\d+)" if r["kernel"] == "_attn_bwd_dkdv_kernel" else r"BLOCK_M=(\d+)",
                                 r["name"]).group(1))
            want = "has_wgmma" if cap == 90 and rows >= 64 else "has_mma_sync"
            assert r[want], f"{r['name']}: no {want[4:]} (tensor-core) instructions"


OTHER_TRITON = os.environ.get("BEIT_FAST_TRITON_SITE")  # a folder holding another Triton (pip install --target)


@pytest.mark.skipif(not OTHER_TRITON, reason="set BEIT_FAST_TRITON_SITE to a folder holding another Triton (the "
                    "GPU image's 3.6: a 188 MB wheel, not downloaded by CI)")
def test_other_triton_compiles_every_kernel_for_sm90a(tmp_path):
    """The lent GPU's image runs Triton 3.6, CI 3.8: every kernel at every configuration also compiles for
    sm_90a with the Triton in BEIT_FAST_TRITON_SITE, within the shared memory, with tensor-core instructions.
    Register spills are reported, not failed: a spilling configuration is still correct, and the autotuner
    times it against the others on the card.

        pip download --no-deps --only-binary=:all: triton==3.6.0 -d /tmp/t36
        pip install --no-deps --target /tmp/t36site /tmp/t36/triton-3.6.0-*.whl
        BEIT_FAST_TRITON_SITE=/tmp/t36site pytest tests/test_kernel_compile.py -k other_triton
    """
    path = tmp_path / "sm90.json"
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(filter(None, [OTHER_TRITON, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__, triton.__file__)"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split()[1].startswith(OTHER_TRITON), r.stdout + r.stderr
    p = subprocess.run([sys.executable, "-m", "beit_fast.kernels._compile_check", "--capability", "90", "--json",
                        str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, f"Triton {r.stdout.split()[0]}: compile for sm_90a failed:\n{p.stderr[-4000:]}"
    res = json.loads(path.read_text())
    assert {x["kernel"] for x in res} >= set(ALL_KERNELS + ATTENTION_KERNELS + ("_table_grad_kernel",))
    for x in res:
        assert x["has_cubin"] and x["ptx_target"] == "sm_90a" and 0 <= x["shared"] <= SHARED_LIMIT[90], x
        if x["kernel"] in GEMM_KERNELS:
            assert x["has_wgmma"], x["name"]
        if x["kernel"] in ATTENTION_KERNELS:
            assert x["has_wgmma"] or x["has_mma_sync"], x["name"]
    spills = [f"{x['name']} {x['dtype']}: {x['stack_bytes']} B" for x in res if x["stack_bytes"]]
    print(f"Triton {r.stdout.split()[0]}: {len(res)} kernels for sm_90a; register spills: {spills or 'none'}")


@pytest.mark.parametrize("cap", [80, 90])
def test_no_register_spills(compiled, cap):
    """ptxas puts spilled registers in a stack frame: every kernel must have none (cuobjdump's STACK)."""
    for r in compiled[cap]:
        assert r["stack_bytes"] == 0, f"{r['name']} {r['dtype']}: {r['stack_bytes']} bytes of stack (register spills)"
