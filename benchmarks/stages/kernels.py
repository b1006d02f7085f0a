"""Stage ``kernels``: the rest of the step's own kernels: the fused linear + cross-entropy chunk size swept, and
the patch embedding + mask token against the permute + cuBLAS GEMM baseline (eager and compiled)."""
from __future__ import annotations

import math
import traceback

import torch

from report_lib import RowWriter, spread
from stages.common import CUDA, DEVICE, NUM_MASKED, bench_ms, compile_, config, free, rel_err, reset_peak


def stage_kernels(args, w: RowWriter) -> int:
    import torch.nn.functional as F

    import beit_fast.kernels.cross_entropy as ce_kernels
    from beit_fast.ops import masked_linear_cross_entropy, patch_embed_mask, patch_embed_mask_reference
    from beit_fast.ops.backend import triton_available, triton_interpreting

    cfg, batch = config(args.batch)
    dtype = torch.bfloat16 if CUDA else torch.float32
    runnable = triton_available() and (CUDA or triton_interpreting())
    rc = 0
    # ---- fused linear + CE: chunk sizes (same rows, vocabulary and dtype as the step's head)
    rows, d, vocab = (batch * NUM_MASKED, cfg.embed_dim, cfg.vocab_size) if CUDA else (64, 32, 256)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(rows, d, device=DEVICE, generator=g).to(dtype).requires_grad_()
    wt = (torch.randn(vocab, d, device=DEVICE, generator=g) * d ** -0.5).to(dtype).requires_grad_()
    bias = torch.zeros(vocab, device=DEVICE, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (rows,), device=DEVICE, generator=g)
    y[::50] = -100
    elem = h.element_size()
    mib_list = [4, 8, 16, 32, 64, 128] if CUDA else [0.0625]
    all_rows_mib = rows * vocab * elem / 2**20
    if CUDA:
        mib_list.append(math.ceil(all_rows_mib))
    default = ce_kernels.MAX_CHUNK_BYTES

    def ce_step(backend):
        def fn():
            for t in (h, wt, bias):
                t.grad = None
            masked_linear_cross_entropy(h, wt, bias, y, backend=backend).backward()
        return fn

    for mib in mib_list:
        if not runnable:
            w.emit("ce_chunk", chunk_mib=mib, skip="the Triton kernels cannot run here")
            break
        try:
            ce_kernels.MAX_CHUNK_BYTES = int(mib * 2**20)
            n_rows = ce_kernels.chunk_rows(rows, vocab, elem)
            with torch.no_grad():
                loss = masked_linear_cross_entropy(h, wt, bias, y, backend="triton").item()
            reset_peak()
            s = spread(bench_ms(ce_step("triton"), args.repeats))
            peak = torch.cuda.max_memory_allocated() / 2**20 if CUDA else None
            w.emit("ce_chunk", chunk_mib=mib, rows=n_rows, ms=s["median"], ms_min=s["min"], ms_max=s["max"],
                   peak_mib=peak, loss=loss, note=("default" if int(mib * 2**20) == default else
                                        "all rows in one chunk" if mib >= all_rows_mib else ""))
        except Exception as e:
            rc = 1
            w.emit("ce_chunk", chunk_mib=mib, error=f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            ce_kernels.MAX_CHUNK_BYTES = default
    try:
        def eager_ce():
            for t in (h, wt, bias):
                t.grad = None
            F.cross_entropy(F.linear(h, wt, bias).float(), y, ignore_index=-100).backward()
        reset_peak()
        s = spread(bench_ms(eager_ce, args.repeats))
        w.emit("ce_chunk", chunk_mib=None, rows=rows, ms=s["median"], ms_min=s["min"], ms_max=s["max"],
               peak_mib=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None,
               note=f"baseline: F.linear in {str(dtype).replace('torch.', '')} + F.cross_entropy (fp32 logits)")
    except Exception as e:
        rc = 1
        w.emit("ce_chunk", chunk_mib=None, error=f"eager baseline: {type(e).__name__}: {e}"[:300])
    del h, wt, bias, y
    free()

    # ---- patch embedding + mask token
    # the step's sizes on CUDA; on CPU a tiny image (the Triton kernel runs in the interpreter there)
    img, p, dim = (cfg.img_size, cfg.patch_size, cfg.embed_dim) if CUDA else (32, 8, 64)
    batch = batch if CUDA else 2
    grid = img // p
    px = torch.randn(batch, 3, img, img, device=DEVICE, generator=g).to(dtype)
    pw = (torch.randn(dim, 3, p, p, device=DEVICE, generator=g) * 0.02).to(dtype).requires_grad_()
    pb = torch.zeros(dim, device=DEVICE, dtype=dtype, requires_grad=True)
    tok = torch.zeros(dim, device=DEVICE, requires_grad=True)  # fp32, like the model's mask token
    k = NUM_MASKED if grid * grid >= 2 * NUM_MASKED else grid * grid // 3
    mask = torch.rand(batch, grid * grid, device=DEVICE, generator=g).argsort(1).argsort(1) < k
    gout = torch.randn(batch, grid * grid, dim, device=DEVICE, generator=g).to(dtype)

    def permute_gemm(px, pw, pb, tok, mask):
        """The fair GEMM baseline: patches gathered by a permute (one copy), one cuBLAS GEMM with the bias,
        then the mask token blended in."""
        b_, c, hh, ww = px.shape
        cols = px.reshape(b_, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * p * p)
        x = torch.addmm(pb, cols, pw.reshape(pw.shape[0], -1).t()).reshape(b_, -1, pw.shape[0])
        return torch.where(mask.unsqueeze(-1), tok.to(x.dtype), x)

    compiled_pg = compile_(permute_gemm)
    with torch.no_grad():  # every variant is checked against Conv2d in fp32 before it is timed
        ref_out = patch_embed_mask_reference(px.float(), pw.float(), pb.float(), tok, mask)
    variants = [
        ("conv2d_blend", "Conv2d + flatten + blend (the official code path), eager",
         lambda: patch_embed_mask_reference(px, pw, pb, tok.to(dtype), mask)),
        ("permute_gemm", "permute copy + cuBLAS addmm + torch.where mask token, eager",
         lambda: permute_gemm(px, pw, pb, tok, mask)),
        ("permute_gemm_compiled", "the same under torch.compile (inductor fuses the copy and the blend)",
         lambda: compiled_pg(px, pw, pb, tok, mask)),
        ("triton_fused", "beit_fast patch_embed_mask (one Triton kernel, no im2col copy, masked tiles skipped)",
         lambda: patch_embed_mask(px, pw, pb, tok, mask, backend="triton")),
    ]
    for name, runs, fn in variants:
        if name == "triton_fused" and not runnable:
            w.emit("patch_embed", variant=name, runs=runs, skip="the Triton kernels cannot run here")
            continue
        try:
            def step(fn=fn):
                for t in (pw, pb, tok):
                    t.grad = None
                fn().backward(gout)

            with torch.no_grad():
                err = rel_err(fn(), ref_out)
            step()
            reset_peak()
            s = spread(bench_ms(step, args.repeats))
            w.emit("patch_embed", variant=name, runs=runs, ms=s["median"], ms_min=s["min"], ms_max=s["max"],
                   peak_mib=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None, rel_err_vs_fp32=err)
        except Exception as e:
            rc = 1
            traceback.print_exc()
            w.emit("patch_embed", variant=name, runs=runs, error=f"{type(e).__name__}: {str(e)[:300]}")
    return rc
