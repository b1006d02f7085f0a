"""The stages of ``gpu_report.py``, each run as its own process that appends rows to ``--rows``.

    python benchmarks/gpu_stages.py step --variants beit_fast,reference_eager --rows FILE
    python benchmarks/gpu_stages.py warm --variants timm_compiled --rows FILE
    python benchmarks/gpu_stages.py attention --candidates math,sdpa,triton,cudnn,xformers --rows FILE
    python benchmarks/gpu_stages.py kernels --rows FILE          # CE chunk sweep, patch embedding
    python benchmarks/gpu_stages.py fp8 --rows FILE              # FP8 step + its loss curve
    python benchmarks/gpu_stages.py finetune --variants ft_eager,ft_beit_fast --rows FILE   # fine-tuning step

On CUDA: BEiT-B/16 at 224, vocabulary 8192, 75 masked patches, batch ``--batch`` (256), bf16 autocast.
On CPU (the tests, ``gpu_report.py --cpu-smoke``): a tiny model at batch 4, fp32; the numbers mean
nothing there, the code paths are what is checked. ``BEIT_FAST_SMOKE_NO_COMPILE=1`` replaces every
torch.compile by the eager module (CPU compiles take minutes on 2 cores).

Step variants (``--variants``; every one: same weights init where the model is ours, same batch, same
masks and tokens, AdamW with clipping at 3.0, one optimizer update per step):

  beit_fast            FastPretrainEngine.train_step: compiled forward+loss+backward (fullgraph), fused
                       attention (auto), Triton patch embedding + fused linear-CE, fused AdamW + clip;
                       ``--extras`` adds, on the same compiled engine: sync_free (the row below), profile
                       (the component table), curve (the bf16 loss curve the fp8 stage compares against)
  beit_fast_sync_free  the same compiled loss, but no host sync in the step: clipping on the device and
                       fused AdamW's found_inf skipping a non-finite update (the engine reads loss and grad
                       norm with .tolist()/.item(): two syncs per step)
  beit_fast_cudagraphs the sync-free step with torch.compile(mode="reduce-overhead") (CUDA graphs)
  beit_fast_autotune   torch.compile(mode="max-autotune-no-cudagraphs"): inductor autotunes the GEMMs
                       with their bias/GELU epilogues
  beit_fast_fp8        FastPretrainEngine(fp8=True): torchao float8 GEMMs for QKV and MLP
  reference_eager      PretrainEngine: the eager reference step (official semantics) under bf16 autocast
  reference_compiled   the same with torch.compile(MIMLoss) (graph breaks at the boolean-mask indexing)
  hf_eager             transformers' BeitForMaskedImageModeling, attn_implementation="sdpa", with labels
                       (HF's own loss: lm_head on all 196 tokens, then the masked rows)
  hf_compiled          the same under torch.compile
  hf_patched           HF's model after beit_fast.interop.apply_beit_fast_to_hf (eager)
  hf_patched_compiled  the same under torch.compile
  hf_patched_fused     hf_patched with the opt-in fused_loss=True (masked rows only, no [B, N, V] logits)
  timm_compiled        timm's Beit body (beit_base_patch16_224 layout, shared relative position bias, its
                       fused SDPA attention) + a mask token + our masked-only fused head, compiled

Fine-tuning step variants (``finetune --variants``; ``finetune_variants.py``): BEiT-B/16 at 224, 1000 classes,
mixup/cutmix soft targets, drop path 0.1, fused AdamW over the layer-decay groups; ft_eager (beit_fast.finetune's
eager step), ft_beit_fast (the compiled fast step, attention auto), ft_beit_fast_triton (attention triton),
ft_timm_compiled (timm's beit_base_patch16_224 in the same compiled step). Rows in the ``finetune_step`` table.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report_lib import RowWriter, spread  # noqa: E402
from step_common import PEAK_TFLOPS, FixedTokens, finetune_flops_per_image, mfu_percent, train_flops_per_image  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA:  # tiny CPU runs: one thread (two contending threads on a shared 2-core machine are 10x slower)
    torch.set_num_threads(1)
SMOKE_NO_COMPILE = os.environ.get("BEIT_FAST_SMOKE_NO_COMPILE") == "1"
NUM_MASKED = 75
SEED = 0


def compile_(obj, **kw):
    if SMOKE_NO_COMPILE:
        return obj
    return torch.compile(obj, **kw)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def graph_breaks() -> int:
    try:
        from torch._dynamo.utils import counters
        return int(sum(counters["graph_break"].values()))
    except Exception:
        return -1


def amp():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=CUDA)


# --------------------------------------------------------------------------------------------------
# sizes, data
# --------------------------------------------------------------------------------------------------
def config(batch: int | None):
    from beit_fast.model.beit import get_config

    if CUDA:
        return get_config("base"), batch or 256
    return get_config("tiny", vocab_size=1024), batch or 4


def make_data(cfg, batch: int, seed: int = 0) -> dict:
    """Images, tokenizer-view images, a blockwise mask of exactly 75 patches (CPU: 40%) and random tokens."""
    from beit_fast.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    grid = cfg.grid_size
    k = NUM_MASKED if grid * grid >= 2 * NUM_MASKED else max(1, int(0.4 * grid * grid))
    gen = MaskingGenerator((grid, grid), k, fixed_count=True, min_num_patches=min(16, k))
    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(np.stack([gen(rng).reshape(-1) for _ in range(batch)])).bool()
    return {
        "images": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g).to(DEVICE),
        "tok_images": torch.rand(batch, 3, grid * 8, grid * 8, generator=g).to(DEVICE),
        "masks": masks.to(DEVICE),
        "tokens": torch.randint(0, cfg.vocab_size, (batch, grid * grid), generator=g).to(DEVICE),
        "num_masked": k,
    }


# --------------------------------------------------------------------------------------------------
# step variants
# --------------------------------------------------------------------------------------------------
def _schedule(lr: float = 1e-4, n: int = 10**6) -> np.ndarray:
    return np.full(n, lr)


def _our_engine(cfg, data, *, fast: bool, **fast_kw):
    from beit_fast.train.mim import FastPretrainEngine, PretrainEngine
    from beit_fast.model.beit import build_model
    from beit_fast.train.optim import build_optimizer

    torch.manual_seed(SEED)
    model = build_model(cfg).to(DEVICE)
    tok = FixedTokens(data["tokens"], cfg.vocab_size)
    args = (model, tok, build_optimizer(model, 1e-4, 0.05), DEVICE, _schedule(), _schedule(0.05))
    amp_dtype = torch.bfloat16 if CUDA else None
    if not fast:
        return PretrainEngine(*args, amp_dtype=amp_dtype)
    model.configure_fast_path(attention="auto", fused_embed="auto")
    fp8 = fast_kw.pop("fp8", False)
    if fp8 and not CUDA:  # CPU smoke: the same conversion, emulated
        from beit_fast.model.fp8 import convert_to_fp8_training
        convert_to_fp8_training(model, emulate=True)
        fp8 = False
    return FastPretrainEngine(*args, amp_dtype=amp_dtype, num_masked=data["num_masked"],
                              compile=not SMOKE_NO_COMPILE, fp8=fp8, **fast_kw)


def fast_description(engine) -> str:
    from beit_fast.ops.attention import resolve_attention_backend
    from beit_fast.ops.backend import resolve_backend

    cfg = engine.model.cfg
    q = torch.empty(1, cfg.num_heads, 4, cfg.embed_dim // cfg.num_heads, device=DEVICE,
                    dtype=torch.bfloat16 if CUDA else torch.float32)
    attn = resolve_attention_backend(engine.model.blocks[0].attn.attn_backend, q)
    ops = resolve_backend(None, q)
    return (f"FastPretrainEngine, torch.compile(fullgraph) of fwd+loss+bwd; attention={attn}, "
            f"patch embed + linear-CE={ops}; fused AdamW + clip")


def sync_free_step(engine, batch, i: int):
    """engine.train_step without its two host syncs: the gradient norm stays on the device, and fused
    AdamW skips the update itself when it is not finite (``found_inf``, as under a GradScaler)."""
    engine.apply_schedule(i)
    engine.model.train()
    engine.optimizer.zero_grad(set_to_none=True)
    images, tok_images, masks = batch
    tokens = engine.tokenize(tok_images, masks)
    loss, _ = engine.compute_loss(images, masks, tokens)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(engine._params, engine.clip_grad or math.inf, foreach=True)
    if engine.optimizer.defaults.get("fused"):
        engine.optimizer.found_inf = (~torch.isfinite(norm)).float()
    engine.optimizer.step()
    return loss.detach()


class TimmMIM(nn.Module):
    """timm's Beit body with the pretraining layout (shared relative position bias, no absolute
    position embedding, LayerScale), a mask token, and our masked-only fused head + loss."""

    def __init__(self, cfg, num_masked: int) -> None:
        super().__init__()
        from timm.models.beit import Beit

        self.body = Beit(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                         drop_path_rate=cfg.drop_path_rate, init_values=cfg.init_values, use_abs_pos_emb=False,
                         use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.num_masked = num_masked

    def forward(self, images, masks, tokens):
        from beit_fast.model.beit import masked_index
        from beit_fast.ops.cross_entropy import masked_linear_cross_entropy

        b = self.body
        x = b.patch_embed(images)
        w = masks.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.type_as(x) * w
        x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1).type_as(x), x), dim=1)
        x = b.pos_drop(x)
        rel = b.rel_pos_bias()
        for blk in b.blocks:
            x = blk(x, shared_rel_pos_bias=rel)
        x = b.norm(x)[:, 1:]
        index = masked_index(masks, self.num_masked)
        hidden = x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1])).reshape(-1, x.shape[-1])
        labels = tokens.gather(1, index).masked_fill(~masks.gather(1, index), -100).reshape(-1)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else hidden.dtype
        return masked_linear_cross_entropy(hidden.to(dtype), self.lm_head.weight.to(dtype),
                                           self.lm_head.bias.to(dtype), labels, ignore_index=-100)


def _hf_model(cfg, patched: bool, fused_loss: bool = False):
    import transformers

    from beit_fast.interop import apply_beit_fast_to_hf

    hf_cfg = transformers.BeitConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads, intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio),
        image_size=cfg.img_size, patch_size=cfg.patch_size, use_mask_token=True,
        use_shared_relative_position_bias=True, use_absolute_position_embeddings=False,
        layer_scale_init_value=cfg.init_values, layer_norm_eps=cfg.layer_norm_eps,
        drop_path_rate=cfg.drop_path_rate, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(SEED)
    model = transformers.BeitForMaskedImageModeling._from_config(hf_cfg, attn_implementation="sdpa")
    model = model.to(DEVICE).train()
    if patched:
        apply_beit_fast_to_hf(model, fused_loss=fused_loss)
    return model


def _plain_step(module, params, forward, clip: float = 3.0):
    """zero_grad, forward under autocast -> loss, backward, clip, fused AdamW, one host read of the loss."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=CUDA or None)

    def step(i):
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return loss.item()

    return step


def build_variant(name: str, cfg, data) -> tuple:
    """``(step(i) -> loss, description, keepalive)`` for a variant of the module docstring."""
    batch = (data["images"], data["tok_images"], data["masks"])
    if name == "beit_fast":
        eng = _our_engine(cfg, data, fast=True)
        return (lambda i: eng.train_step(batch, i).loss), fast_description(eng), eng
    if name == "beit_fast_sync_free":
        eng = _our_engine(cfg, data, fast=True)
        return (lambda i: sync_free_step(eng, batch, i)), "beit_fast without host syncs (device-side skip)", eng
    if name == "beit_fast_cudagraphs":
        eng = _our_engine(cfg, data, fast=True, compile_mode="reduce-overhead")
        return (lambda i: sync_free_step(eng, batch, i)), "beit_fast sync-free, compile mode reduce-overhead " \
                                                          "(CUDA graphs)", eng
    if name == "beit_fast_autotune":
        eng = _our_engine(cfg, data, fast=True, compile_mode="max-autotune-no-cudagraphs")
        return (lambda i: eng.train_step(batch, i).loss), "beit_fast, compile mode max-autotune-no-cudagraphs " \
                                                          "(GEMM + epilogue autotuning)", eng
    if name == "beit_fast_fp8":
        eng = _our_engine(cfg, data, fast=True, fp8=True)
        return (lambda i: eng.train_step(batch, i).loss), "beit_fast with --fp8 (torchao float8 GEMMs for QKV " \
                                                          "and MLP, tensorwise scaling)", eng
    if name in ("reference_eager", "reference_compiled"):
        eng = _our_engine(cfg, data, fast=False)
        desc = "PretrainEngine (official semantics), eager, bf16 autocast"
        if name == "reference_compiled":
            eng.train_module = compile_(eng.loss_module)
            desc = "PretrainEngine with torch.compile(MIMLoss) (default mode)"
        return (lambda i: eng.train_step(batch, i).loss), desc, eng
    if name.startswith("hf_"):
        patched = name.startswith("hf_patched")
        fused = name == "hf_patched_fused"
        model = _hf_model(cfg, patched, fused_loss=fused)
        fwd = compile_(model) if name.endswith("_compiled") else model
        labels = data["tokens"][data["masks"]]

        def forward():
            return fwd(pixel_values=data["images"], bool_masked_pos=data["masks"], labels=labels).loss

        desc = ("HF BeitForMaskedImageModeling (sdpa)" + (" + apply_beit_fast_to_hf" if patched else "")
                + (" (fused_loss=True)" if fused else "")
                + (", torch.compile" if name.endswith("_compiled") else ", eager") + ", HF's loss with labels")
        return _plain_step(model, list(model.parameters()), forward), desc, model
    if name == "timm_compiled":
        torch.manual_seed(SEED)
        model = TimmMIM(cfg, data["num_masked"]).to(DEVICE).train()
        fwd = compile_(model)

        def forward():
            return fwd(data["images"], data["masks"], data["tokens"])

        desc = ("timm Beit body (beit_base_patch16_224 layout, shared rel-pos bias, fused SDPA) + mask token + "
                "beit_fast masked-only fused head, torch.compile")
        return _plain_step(model, list(model.parameters()), forward), desc, model
    raise ValueError(f"unknown variant {name!r}")


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def measure(step, start: int, warmup: int, repeats: int, inner: int) -> tuple[list[float], float, int]:
    """Warm up (compile, autotune, allocator), then ``repeats`` timings of ``inner`` steps each (host clock
    between device synchronisations; the steps themselves may sync). Returns (ms per step for each repeat,
    loss of the first step, next step index)."""
    i = start
    first = None
    for _ in range(warmup):
        loss = step(i)
        first = _as_float(loss) if first is None else first
        i += 1
    reset_peak()
    per = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            step(i)
            i += 1
        sync()
        per.append((time.perf_counter() - t0) * 1e3 / inner)
    return per, first, i


def step_row(w: RowWriter, name: str, runs: str, per: list[float], cfg, batch: int, k: int, setup_s: float,
             first_loss, **extra) -> dict:
    s = spread(per)
    ips = batch / (s["median"] / 1e3)
    row = dict(name=name, runs=runs, batch=batch, ms=s["median"], ms_min=s["min"], ms_max=s["max"], ms_iqr=s["iqr"],
               repeats=s["n"], images_per_s=ips, setup_s=round(setup_s, 1), first_loss=first_loss,
               peak_mem_gib=peak_gib(), device=torch.cuda.get_device_name() if CUDA else "cpu", **extra)
    if CUDA:
        row["mfu_percent"] = mfu_percent(train_flops_per_image(cfg, k), ips)
    return w.emit("step", **row)


def loss_curve(engine, cfg, batch: int, steps: int, w: RowWriter, variant: str, init_state: dict) -> None:
    """``steps`` optimizer steps from ``init_state`` over 4 fixed batches in turn (lr warmup over 20 steps
    to 1e-3, then constant; weight decay 0.05): the curve the fp8 stage is compared against."""
    engine.model.load_state_dict(init_state)
    engine.optimizer.state.clear()
    n = steps + 1
    engine.lr_schedule = np.array([1e-3 * min(1.0, (i + 1) / 20) for i in range(n)])
    engine.wd_schedule = np.full(n, 0.05)
    batches = [make_data(cfg, batch, seed=100 + j) for j in range(4)]
    losses = []
    for i in range(steps):
        d = batches[i % 4]
        engine.tokenizer.tokens = d["tokens"]
        losses.append(engine.train_step((d["images"], d["tok_images"], d["masks"]), i).loss)
    w.emit("loss_curve", variant=variant, batch=batch, steps=steps, losses=[round(x, 5) for x in losses])


def run_profile(engine, batch, start: int, step_ms: float, w: RowWriter, text_out: str | None) -> None:
    from profile_step import component_rows, format_components, kernel_records, profile_steps

    steps = 3
    prof = profile_steps(lambda i: engine.train_step(batch, start + i), steps=steps, cuda=CUDA)
    comp, top = component_rows(kernel_records(prof.events()), steps=steps, step_ms=step_ms)
    for r in comp:
        w.emit("profile", **r)
    for r in top[:15]:
        w.emit("profile_top", **r)
    if text_out:
        key = "cuda_time_total" if CUDA else "cpu_time_total"
        Path(text_out).write_text(format_components(comp) + "\n\n"
                                  + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def stage_step(args, w: RowWriter) -> int:
    cfg, batch = config(args.batch)
    data = make_data(cfg, batch)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    failures = 0
    extras = set(filter(None, args.extras.split(",")))
    for name in filter(None, args.variants.split(",")):
        t0 = time.time()
        try:
            step, desc, keep = build_variant(name, cfg, data)
            init_state = None
            if "curve" in extras and name == "beit_fast":
                init_state = {k: v.detach().clone() for k, v in keep.model.state_dict().items()}
            breaks0 = graph_breaks()
            per, first, nxt = measure(step, 0, warmup, repeats, inner)
            extra = {}
            if name != "beit_fast" and ("compiled" in name or "timm" in name):
                extra["graph_breaks"] = graph_breaks() - breaks0
            fast = step_row(w, name, desc, per, cfg, batch, data["num_masked"], time.time() - t0 - sum(per) *
                            inner / 1e3, first, **extra)
            if name == "beit_fast":
                engine_batch = (data["images"], data["tok_images"], data["masks"])
                if "sync_free" in extras:
                    _extra(w, "sync_free", lambda: _sync_free_row(w, keep, engine_batch, nxt, cfg, batch, data,
                                                                    warmup, repeats, inner))
                    nxt += warmup + repeats * inner
                if "profile" in extras:
                    _extra(w, "profile", lambda: run_profile(keep, engine_batch, nxt + 10, fast["ms"], w,
                                                             args.profile_out))
                if "curve" in extras:
                    _extra(w, "curve", lambda: loss_curve(keep, cfg, batch, args.curve_steps, w, "bf16", init_state))
            del step, keep
        except Exception as e:  # one variant failing must not cost the others
            failures += 1
            traceback.print_exc()
            w.emit("step", name=name, error=f"{type(e).__name__}: {str(e)[:400]}", setup_s=round(time.time() - t0, 1))
        free()
    return 1 if failures else 0


def _extra(w: RowWriter, what: str, fn) -> None:
    try:
        fn()
    except Exception as e:
        traceback.print_exc()
        w.emit("step", name=f"beit_fast[{what}]", error=f"{type(e).__name__}: {str(e)[:400]}")


def _sync_free_row(w, engine, batch, start, cfg, bsz, data, warmup, repeats, inner) -> None:
    t0 = time.time()
    per, first, _ = measure(lambda i: sync_free_step(engine, batch, i), start, warmup, repeats, inner)
    with contextlib.suppress(AttributeError):
        del engine.optimizer.found_inf
    step_row(w, "beit_fast_sync_free", "beit_fast's compiled loss, no host syncs in the step (device-side clip "
             "and found_inf skip)", per, cfg, bsz, data["num_masked"], time.time() - t0 - sum(per) * inner / 1e3, first)


def stage_warm(args, w: RowWriter) -> int:
    """Compile (and run twice) each variant, to fill inductor's caches for the measuring stage; under a
    share of the card's memory so that parallel warm-ups cannot starve each other."""
    if CUDA and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    cfg, batch = config(args.batch)
    data = make_data(cfg, batch)
    rc = 0
    for name in filter(None, args.variants.split(",")):
        t0 = time.time()
        try:
            step, _, keep = build_variant(name, cfg, data)
            step(0)
            step(1)
            sync()
            w.emit("warm", variant=name, seconds=round(time.time() - t0, 1))
            del step, keep
        except Exception as e:
            rc = 1
            w.emit("warm", variant=name, seconds=round(time.time() - t0, 1), error=f"{type(e).__name__}: {str(e)[:300]}")
        free()
    return rc


# --------------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------------
def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _bench_ms(fn, repeats: int) -> list[float]:
    """ms per call, one value per repeat: triton's do_bench (CUDA events, median) on CUDA, host clock on CPU."""
    if CUDA:
        import triton.testing

        return [float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")) for _ in range(repeats)]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]


def stage_attention(args, w: RowWriter) -> int:
    from attention_candidates import FLEX_LADDER, candidates, cudnn_layout

    dtype = torch.bfloat16 if CUDA else torch.float32
    shapes = parse_shapes(args.shapes or ("256x12x197x64,64x12x577x64" if CUDA else "2x2x197x16,1x2x577x16"))
    names = list(filter(None, args.candidates.split(",")))
    rc = 0
    for b, h, n, d in shapes:
        label = f"B{b} H{h} N{n} Dh{d}"
        g = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v, dout = (torch.randn(b, h, n, d, device=DEVICE, generator=g).to(dtype) for _ in range(4))
        bias = torch.randn(h, n, n, device=DEVICE, generator=g)
        scale = d ** -0.5
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        # fp32 reference (math, upcast inputs), and PyTorch's own error in the run dtype (math backend)
        ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
        from beit_fast.ops.attention import attention_with_bias
        ref_out = attention_with_bias(*ref_leaves[:3], ref_leaves[3], scale, backend="math")
        ref = [ref_out.detach(), *torch.autograd.grad(ref_out, ref_leaves, dout.float())]
        del ref_out, ref_leaves
        math_out = attention_with_bias(*leaves[:3], leaves[3], scale, backend="math")
        math_errs = [_rel_err(x, r) for x, r in zip([math_out.detach(), *torch.autograd.grad(math_out, leaves, dout)],
                                                    ref)]
        del math_out
        tol = [max(2 * e, 1e-5) for e in math_errs]  # flash-attention's rule: <= 2x PyTorch's own error
        flops = 3.5 * 4 * b * h * n * n * d  # forward 4BHN^2D; backward 2.5x forward
        todo = list(names)
        flex_failed = False
        while todo:
            name = todo.pop(0)
            if name == "flex_ladder":  # only when flex failed here: the tiles that fit, in order
                if flex_failed:
                    todo = [f"flex_tiles:{t}" for t in FLEX_LADDER] + todo
                continue
            cand = candidates([name])[0]
            why = cand.unavailable(leaves[0])
            if why:
                w.emit("attention", shape=label, candidate=name, runs=cand.runs, skip=why)
                continue
            try:
                for t in leaves:
                    t.grad = None
                out = cand.fn(*leaves[:3], leaves[3], scale)
                grads = torch.autograd.grad(out, leaves, dout)
                errs = [_rel_err(x, r) for x, r in zip([out.detach(), *grads], ref)]
                del out, grads
                ok = all(e <= t for e, t in zip(errs, tol)) and all(math.isfinite(e) for e in errs)

                def fwd_bwd():
                    o = cand.fn(*leaves[:3], leaves[3], scale)
                    torch.autograd.grad(o, leaves, dout)

                def fwd():
                    with torch.no_grad():
                        cand.fn(*leaves[:3], leaves[3], scale)

                reset_peak()
                per = _bench_ms(fwd_bwd, args.repeats)
                s = spread(per)
                fwd_ms = spread(_bench_ms(fwd, 1))["median"]
                note = cudnn_layout(leaves[0]) if name == "cudnn" else ""
                w.emit("attention", shape=label, candidate=name, runs=cand.runs, ms=s["median"], ms_min=s["min"],
                       ms_max=s["max"], fwd_ms=fwd_ms, tflops=flops / (s["median"] * 1e-3) / 1e12,
                       max_rel_err=max(errs), rel_err={"out": errs[0], "dq": errs[1], "dk": errs[2], "dv": errs[3],
                                                      "dbias": errs[4]},
                       tolerance=dict(zip(["out", "dq", "dk", "dv", "dbias"], tol)), ok=ok, note=note,
                       peak_mem_gib=peak_gib())
            except Exception as e:
                rc = 1
                if name == "flex":
                    flex_failed = True
                traceback.print_exc()
                w.emit("attention", shape=label, candidate=name, runs=cand.runs,
                       error=f"{type(e).__name__}: {str(e)[:400]}")
            free() if name.startswith("flex") else (torch.cuda.empty_cache() if CUDA else None)
    return rc


# --------------------------------------------------------------------------------------------------
# the rest of the step: CE chunk size, patch embedding
# --------------------------------------------------------------------------------------------------
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
            s = spread(_bench_ms(ce_step("triton"), args.repeats))
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
        s = spread(_bench_ms(eager_ce, args.repeats))
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
                err = _rel_err(fn(), ref_out)
            step()
            reset_peak()
            s = spread(_bench_ms(step, args.repeats))
            w.emit("patch_embed", variant=name, runs=runs, ms=s["median"], ms_min=s["min"], ms_max=s["max"],
                   peak_mib=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None, rel_err_vs_fp32=err)
        except Exception as e:
            rc = 1
            traceback.print_exc()
            w.emit("patch_embed", variant=name, runs=runs, error=f"{type(e).__name__}: {str(e)[:300]}")
    return rc


# --------------------------------------------------------------------------------------------------
# fp8
# --------------------------------------------------------------------------------------------------
def stage_fp8(args, w: RowWriter) -> int:
    from beit_fast.model.fp8 import fp8_unavailable_reason

    why = fp8_unavailable_reason(DEVICE, emulate=not CUDA)
    if why:
        w.emit("step", name="beit_fast_fp8", skip=why, error=f"not run: {why}")
        return 0
    cfg, batch = config(args.batch)
    data = make_data(cfg, batch)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    t0 = time.time()
    step, desc, eng = build_variant("beit_fast_fp8", cfg, data)
    init_state = {k: v.detach().clone() for k, v in eng.model.state_dict().items()}
    per, first, _ = measure(step, 0, warmup, repeats, inner)
    step_row(w, "beit_fast_fp8", desc, per, cfg, batch, data["num_masked"], time.time() - t0 - sum(per) * inner / 1e3,
             first)
    if args.curve_steps:
        loss_curve(eng, cfg, batch, args.curve_steps, w, "fp8", init_state)
    return 0


# --------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------
def stage_finetune(args, w: RowWriter) -> int:
    """The fine-tuning step variants (``finetune_variants.py``), each timed like the pretraining steps."""
    from finetune_variants import build_finetune_variant, finetune_config, make_finetune_data

    cfg, batch, classes = finetune_config(CUDA, args.batch)
    data = make_finetune_data(cfg, batch, classes, DEVICE)
    warmup, repeats, inner = (3, args.repeats, 4) if CUDA else (1, 2, 1)
    failures = 0
    for name in filter(None, args.variants.split(",")):
        if name.endswith("_triton") and not CUDA:  # Triton's interpreter at 197 tokens: minutes a step
            w.emit("finetune_step", name=name, error="not run: the Triton attention needs CUDA (on a CPU it would "
                   "run in Triton's interpreter)")
            continue
        t0 = time.time()
        try:
            step, desc, keep = build_finetune_variant(
                name, cfg, classes, data, DEVICE, lambda m: compile_(m, fullgraph=True, dynamic=False), seed=SEED)
            breaks0 = graph_breaks()
            per, first, _ = measure(step, 0, warmup, repeats, inner)
            s = spread(per)
            ips = batch / (s["median"] / 1e3)
            row = dict(name=name, runs=desc, batch=batch, classes=classes, ms=s["median"], ms_min=s["min"],
                       ms_max=s["max"], ms_iqr=s["iqr"], repeats=s["n"], images_per_s=ips,
                       setup_s=round(time.time() - t0 - sum(per) * inner / 1e3, 1), first_loss=first,
                       peak_mem_gib=peak_gib(), device=torch.cuda.get_device_name() if CUDA else "cpu")
            if "compiled" in name or "beit_fast" in name:
                row["graph_breaks"] = graph_breaks() - breaks0
            if CUDA:
                row["mfu_percent"] = mfu_percent(finetune_flops_per_image(cfg, classes), ips)
            w.emit("finetune_step", **row)
            del step, keep
        except Exception as e:  # one variant failing must not cost the others
            failures += 1
            traceback.print_exc()
            w.emit("finetune_step", name=name, error=f"{type(e).__name__}: {str(e)[:400]}",
                   setup_s=round(time.time() - t0, 1))
        free()
    return 1 if failures else 0


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------
def stage_env(args, w: RowWriter) -> int:
    """Versions of everything the numbers depend on, and the card as found (clocks, power, temperature)."""
    import importlib
    import importlib.metadata as md
    import subprocess

    def version(dist: str, module: str | None = None) -> str:
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            v = "not installed"
        if module and v != "not installed":
            try:
                importlib.import_module(module)
            except Exception as e:
                v += f" (import fails: {type(e).__name__}: {str(e)[:120]})"
        return v

    w.emit("env", key="python", value=sys.version.split()[0])
    w.emit("env", key="torch", value=f"{torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    for dist, mod in (("triton", "triton"), ("transformers", None), ("timm", None), ("xformers", "xformers.ops"),
                      ("torchao", "torchao.float8"), ("nvidia-cudnn-frontend", "cudnn")):
        w.emit("env", key=dist, value=version(dist, mod))
    from beit_fast.ops.attention import ATTENTION_BACKENDS, AUTO_PRIORITY
    from beit_fast.ops.backend import triton_available, triton_interpreting

    w.emit("env", key="beit_fast attention backends", value=", ".join(ATTENTION_BACKENDS))
    w.emit("attention_backends", backends=list(ATTENTION_BACKENDS), auto_priority_cuda=list(AUTO_PRIORITY["cuda"]))
    w.emit("env", key="beit_fast Triton kernels", value="interpreted" if triton_interpreting() else
           ("compiled" if triton_available() else "unavailable"))
    if CUDA:
        prop = torch.cuda.get_device_properties(0)
        w.emit("env", key="card", value=f"{prop.name}, capability {prop.major}.{prop.minor}, "
               f"{prop.multi_processor_count} SMs, {prop.total_memory / 2**30:.0f} GiB")
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                "power.draw,power.limit,temperature.gpu", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            w.emit("env", key="nvidia-smi (driver, SM clock, max SM clock, mem clock, power, limit, temp)",
                   value=q.stdout.strip() or q.stderr.strip())
        except Exception as e:
            w.emit("env", key="nvidia-smi", value=f"{type(e).__name__}: {e}")
    w.emit("env", key="peak bf16 TFLOP/s used for MFU", value=PEAK_TFLOPS)
    return 0


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["env", "step", "warm", "attention", "kernels", "fp8", "finetune"])
    p.add_argument("--rows", default=None, help="append result rows (JSON lines) to this file")
    p.add_argument("--batch", type=int, default=None, help="batch of the step stages (CUDA default 256)")
    p.add_argument("--variants", default="beit_fast", help="step (or fine-tuning step) variants (see the module docstring)")
    p.add_argument("--extras", default="", help="with beit_fast: sync_free,profile,curve")
    p.add_argument("--profile-out", default=None, help="write the profiler's tables here")
    p.add_argument("--curve-steps", type=int, default=150, help="steps of the bf16/fp8 loss curves")
    p.add_argument("--candidates", default="math,sdpa,triton,cudnn,xformers", help="attention candidates")
    p.add_argument("--shapes", default=None, help="attention shapes BxHxNxDh,... (CUDA: 256x12x197x64,64x12x577x64)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median and spread)")
    p.add_argument("--memory-fraction", type=float, default=0.3, help="warm: share of the card's memory")
    args = p.parse_args(argv)
    w = RowWriter(args.rows)
    fn = {"env": stage_env, "step": stage_step, "warm": stage_warm, "attention": stage_attention, "kernels": stage_kernels,
          "fp8": stage_fp8, "finetune": stage_finetune}[args.stage]
    return fn(args, w)


if __name__ == "__main__":
    sys.exit(main())
