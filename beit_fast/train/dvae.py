"""Training loop for :class:`~beit_fast.tokenizer.dvae.DiscreteVAE` (the official BEiT repo ships none).

:func:`train_dvae` runs AdamW on the one training engine (:class:`DVAEEngine` over the task module
:class:`DVAELoss`) with a short linear warm-up and a cosine decay of the learning rate, the
Gumbel temperature annealed exponentially from ``cfg.temperature_start`` to ``cfg.temperature_end`` and
the KL weight ramped linearly from 0 (``dvae.temperature_at`` / ``dvae.kl_weight_at``). It evaluates
before and after training on a fixed evaluation set with the *hard* (argmax) codes that tokenization
uses and reports:

* ``recon_mse``: mean squared error on the [0, 1] pixel scale (``unmap_pixels`` of both sides),
* ``codes_used``: number of distinct codes over the evaluation set, ``perplexity``: exp of the entropy of
  the empirical code distribution (both out of ``vocab_size``).

Data: tensors are tokenizer views ``[3, S, S]`` already passed through ``map_pixels`` (values in
[0.1, 0.9]). :func:`train_dvae` accepts a map-style ``torch.utils.data.Dataset`` (items: a tensor or a
tuple whose first element is one), a tensor ``[N, 3, S, S]``, or any other iterable of ``[3, S, S]`` or
``[b, 3, S, S]`` tensors (re-iterated when exhausted). Photographs become such views through the data
pipeline of BEiT itself: :class:`beit_fast.train.tokenizer_training.TokenizerViewDataset` runs
:class:`beit_fast.data.transforms.TokenizerViewTransform` (BEiT's tokenizer view) over ``SampleImages`` or an
``ImageFolderDataset`` (``python -m beit_fast.train_tokenizer``).
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..utils.logs import bar_disable
from .optim import warmup_cosine_schedule
from .engine import Engine, StepResult
from ..tokenizer.base import unmap_pixels
from ..tokenizer.dvae import DiscreteVAE, DVAEConfig, kl_weight_at, temperature_at

__all__ = ["train_dvae", "evaluate_dvae", "codebook_stats", "DVAELoss", "DVAEEngine"]

logger = logging.getLogger("beit_fast.tokenizer")


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------
def _first_tensor(item: Any) -> Tensor:
    if isinstance(item, (tuple, list)):
        item = item[0]
    if not isinstance(item, Tensor):
        raise TypeError(f"data items must be tensors (or tuples starting with one), got {type(item).__name__}")
    return item


def _collate(items: list[Any]) -> Tensor:
    return torch.stack([_first_tensor(it) for it in items])


def _batch_stream(data: Any, batch_size: int, seed: int, num_workers: int = 0) -> Iterator[Tensor]:
    """Endless stream of ``[batch_size, 3, S, S]`` batches from a Dataset, a tensor or an iterable."""
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise ValueError(f"a data tensor must be [N, 3, S, S], got {tuple(data.shape)}")
        g = torch.Generator().manual_seed(seed)
        while True:
            yield data[torch.randint(0, data.shape[0], (batch_size,), generator=g)]
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("the dataset is empty")
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=len(data) >= batch_size,
                            collate_fn=_collate, generator=g, num_workers=num_workers,
                            persistent_workers=num_workers > 0)
        while True:
            for batch in loader:
                yield batch
    else:
        if not isinstance(data, Iterable):
            raise TypeError(f"unsupported data type {type(data).__name__}: give a Dataset, a tensor or an iterable")
        buf: list[Tensor] = []
        while True:
            n_seen = 0
            for item in data:
                t = _first_tensor(item)
                n_seen += 1
                buf.extend(t.unbind(0) if t.dim() == 4 else [t])
                while len(buf) >= batch_size:
                    yield torch.stack(buf[:batch_size])
                    buf = buf[batch_size:]
            if n_seen == 0:
                if buf:
                    yield torch.stack(buf)  # a last partial batch
                    buf = []
                    continue
                raise ValueError("the data iterable is empty (or a one-shot iterator that is exhausted)")


def _take(stream: Iterator[Tensor], n: int) -> list[Tensor]:
    return [next(stream) for _ in range(n)]


def _eval_batches(data: Any, batch_size: int, n_batches: int, seed: int) -> list[Tensor]:
    """A fixed evaluation set: a tensor is used whole, a list/tuple of tensors as given (stacked),
    a map-style dataset's first ``n_batches * batch_size`` items, other iterables' first ``n_batches``."""
    if isinstance(data, Tensor):
        if data.dim() == 3:
            data = data.unsqueeze(0)
        return list(data.split(batch_size))
    if isinstance(data, (list, tuple)) and data and all(isinstance(_first_tensor(d), Tensor) for d in data):
        items = [_first_tensor(d) for d in data]
        if all(t.dim() == 3 for t in items):
            return list(torch.stack(items).split(batch_size))
        return [t if t.dim() == 4 else t.unsqueeze(0) for t in items]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        n = min(len(data), n_batches * batch_size)
        if n == 0:
            raise ValueError("the evaluation dataset is empty")
        return list(torch.stack([_first_tensor(data[i]) for i in range(n)]).split(batch_size))
    return _take(_batch_stream(data, batch_size, seed), n_batches)


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------
def codebook_stats(tokens: Tensor, vocab_size: int) -> dict[str, float]:
    """``codes_used`` (distinct values) and ``perplexity`` (exp entropy of their frequencies)."""
    counts = torch.bincount(tokens.flatten().long().cpu(), minlength=vocab_size).double()
    p = counts / counts.sum().clamp_min(1)
    nz = p[p > 0]
    return {"codes_used": int((counts > 0).sum()), "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


@torch.no_grad()
def evaluate_dvae(model: DiscreteVAE, batches: Sequence[Tensor], device: str | torch.device = "cpu") -> dict[str, float]:
    """Hard-code (argmax) reconstruction MSE on the [0, 1] scale plus codebook usage over ``batches``."""
    was_training = model.training
    model.eval()
    se, n, toks = 0.0, 0, []
    try:
        for x in batches:
            x = x.to(device=device, dtype=torch.float32)
            recon, logits = model(x, hard=True)
            se += float(((unmap_pixels(recon, model.cfg.eps) - unmap_pixels(x, model.cfg.eps)) ** 2).sum())
            n += x.numel()
            toks.append(logits.argmax(dim=1).flatten())
    finally:
        model.train(was_training)
    out = {"recon_mse": se / max(n, 1), "eval_images": sum(int(b.shape[0]) for b in batches)}
    out.update(codebook_stats(torch.cat(toks), model.vocab_size))
    return out


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------
class DVAELoss(nn.Module):
    """The dVAE's task module for :class:`~beit_fast.train.engine.Engine`: ``forward(images [B, 3, S, S] fp32,
    map_pixels range) -> (loss, recon)`` (0-dim fp32; ``recon`` detached) with the Gumbel relaxation at
    :attr:`temperature` and the KL term weighted by :attr:`kl_weight` (both set per step by
    :class:`DVAEEngine`); the last KL term (detached) stays in :attr:`last_kl` for the step records."""

    def __init__(self, model: DiscreteVAE) -> None:
        super().__init__()
        self.model = model
        self.temperature = model.cfg.temperature_start
        self.kl_weight = 0.0
        self.last_kl: Tensor | None = None

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        recon, logits = self.model(images, temperature=self.temperature)
        loss, rec, kl = self.model.loss_terms(images, recon, logits, self.kl_weight)
        self.last_kl = kl.detach()
        return loss, rec.detach()


class DVAEEngine(Engine):
    """The engine over :class:`DVAELoss`, whose step also sets the dVAE's own schedules: the Gumbel temperature
    (:func:`~beit_fast.tokenizer.dvae.temperature_at`) and the KL weight
    (:func:`~beit_fast.tokenizer.dvae.kl_weight_at`) of step ``t`` of ``total_steps``, with the lr of
    ``lr_schedule[t]``."""

    def __init__(self, task_module: DVAELoss, optimizer: torch.optim.Optimizer, device: torch.device,
                 lr_schedule: np.ndarray, total_steps: int, **kwargs: Any) -> None:
        super().__init__(task_module, optimizer, device, lr_schedule, **kwargs)
        self.total_steps = int(total_steps)

    def apply_schedule(self, step: int) -> None:
        super().apply_schedule(step)
        cfg = self.model.cfg
        self.task_module.temperature = temperature_at(step, cfg, self.total_steps)
        self.task_module.kl_weight = kl_weight_at(step, cfg, self.total_steps)


def _dvae_engine(model: DiscreteVAE, device: torch.device, steps: int, lr: float, weight_decay: float,
                 warmup_steps: int | None, grad_clip: float | None) -> DVAEEngine:
    """AdamW (one group, betas 0.9/0.999) with the warm-up + cosine lr
    (:func:`beit_fast.train.optim.warmup_cosine_schedule`: ``warmup_steps``, default 5% of the run, then down to 10% of
    ``lr``), clipping at ``grad_clip``, the non-finite check on the host (a non-finite loss never reaches the
    gradients). Batches ``[B, 3, S, S]`` go to the device as fp32."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    warmup = warmup_steps if warmup_steps is not None else max(1, steps // 20)

    def prepare(x: Tensor) -> tuple[Tensor]:
        return (x.to(device=device, dtype=torch.float32, non_blocking=True),)

    return DVAEEngine(DVAELoss(model), opt, device, warmup_cosine_schedule(lr, steps, warmup), steps,
                      clip_grad=grad_clip, prepare=prepare, nonfinite_check="host")


def _reference_eval(model: DiscreteVAE, data: Any, batch_size: int, eval_batches: int, seed: int,
                    device: torch.device) -> tuple[list[Tensor], dict[str, float], float]:
    """``(evaluation set, untrained evaluation, mean-colour MSE)``; warns when the data are not in the
    map_pixels range."""
    cfg = model.cfg
    eval_set = _eval_batches(data, batch_size, max(1, eval_batches), seed + 1)
    random.seed(seed)  # eval draws must not change the training crops
    lo, hi = float(eval_set[0].min()), float(eval_set[0].max())
    if lo < cfg.eps - 0.02 or hi > 1 - cfg.eps + 0.02:
        logger.warning("data range [%.3f, %.3f] is outside the map_pixels range [%.2f, %.2f]: pass "
                       "map_pixels(images in [0, 1])", lo, hi, cfg.eps, 1 - cfg.eps)
    initial = evaluate_dvae(model, eval_set, device)
    # reference point: predicting every crop by its own mean colour (what a 1-token code could do)
    mean_color_mse = float(sum(((unmap_pixels(b.float(), cfg.eps) - unmap_pixels(b.float(), cfg.eps)
                                 .mean(dim=(2, 3), keepdim=True)) ** 2).sum() for b in eval_set)
                           / sum(b.numel() for b in eval_set))
    logger.info("initial eval: recon_mse %.5f, codes used %d/%d", initial["recon_mse"], initial["codes_used"],
                cfg.vocab_size)
    return eval_set, initial, mean_color_mse


@dataclass
class _Trace:
    """What a run keeps of its steps: the step records (every ``log_every`` steps and the last), every step's
    training recon loss, its running average for the progress bar."""

    history: list = field(default_factory=list)
    recon: list = field(default_factory=list)
    recon_average: float = 0.0

    def add(self, step: int, result: StepResult, engine: DVAEEngine, record: bool, bar) -> None:
        task = engine.task_module
        self.recon.append(result.metric)
        self.recon_average = result.metric if len(self.recon) == 1 else 0.9 * self.recon_average + 0.1 * result.metric
        if not record:
            return
        logs = {"loss": result.loss, "recon": result.metric, "kl": float(task.last_kl)}  # (a host read at records only)
        temp, klw = task.temperature, task.kl_weight
        self.history.append(dict(step=step, temperature=temp, kl_weight=klw,
                                 lr=engine.optimizer.param_groups[0]["lr"], **logs))
        bar.set_postfix(recon=f"{self.recon_average:.4f}", kl=f"{logs['kl']:.2f}", T=f"{temp:.3f}")
        logger.info("step %d: loss %.5f recon %.5f kl %.3f T %.4f kl_w %.2e", step, logs["loss"], logs["recon"],
                    logs["kl"], temp, klw)


def _run_steps(engine: DVAEEngine, stream: Iterator[Tensor], steps: int, log_every: int, save_every: int | None,
               save: Callable[[int, dict], None], progress: bool) -> _Trace:
    """``steps`` engine steps over ``stream``; the partial checkpoint every ``save_every`` steps. A non-finite
    loss (or gradient norm) makes no update: the model before it is saved and the run stops."""
    from tqdm.auto import tqdm

    trace = _Trace()
    bar = tqdm(range(steps), disable=bar_disable(progress), desc="dVAE", dynamic_ncols=True)
    for step in bar:
        result = engine.train_step(next(stream), step)
        if result.skipped:
            save(step, {"partial": True, "history": trace.history[-1:]})
            raise FloatingPointError(f"non-finite dVAE loss at step {step}: loss {result.loss}, gradient norm "
                                     f"{result.grad_norm}; the model before this step was saved (if a path was "
                                     "given). Lower the lr or the KL weight")
        trace.add(step, result, engine, step % log_every == 0 or step == steps - 1, bar)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save(step + 1, {"partial": True, "history": trace.history[-1:]})
    bar.close()
    return trace


def train_dvae(
    cfg: DVAEConfig,
    images_or_dataset: Any,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 1e-3,
    out_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    *,
    eval_data: Any = None,
    eval_batches: int = 4,
    save_every: int | None = 500,
    log_every: int = 50,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    grad_clip: float | None = 1.0,
    model: DiscreteVAE | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Train a :class:`DiscreteVAE` and return its metrics (also stored in the checkpoint).

    Args:
        cfg: model / schedule configuration.
        images_or_dataset: training data (see module docstring): tokenizer views in the map_pixels range.
        steps, batch_size, lr: optimisation length, batch size, peak AdamW learning rate (warm-up over
            ``warmup_steps``, default 5% of the run, then cosine decay to 10% of ``lr``).
        out_path: checkpoint path (``None``: no checkpoint). Written atomically every ``save_every`` steps
            and at the end.
        device, seed, progress: where to train, RNG seed (torch, Python ``random``, numpy), tqdm bar.
        eval_data: evaluation data in the same forms; default: ``eval_batches`` batches drawn once, before
            training, from a separately seeded stream of ``images_or_dataset`` (not held out then).
        model: continue training this model instead of building a fresh one from ``cfg``.
        num_workers: DataLoader worker processes for a map-style dataset (0: load in this process).

    The steps run on the one training engine (:class:`DVAEEngine`); a non-finite loss (or gradient norm) makes
    no update, saves the model before it and raises ``FloatingPointError``.

    Returns a dict with ``initial`` and final evaluation (``recon_mse``, ``codes_used``, ``perplexity``),
    ``mean_color_mse`` (the MSE of predicting each evaluation crop by its mean colour: a reference point),
    ``train_recon_first``/``train_recon_last`` (mean training recon loss over the first/last 10% of steps,
    map_pixels scale, Gumbel path), ``history``, ``time_s``, ``images_per_s`` and the checkpoint path.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    device = torch.device(device)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)

    model = (model if model is not None else DiscreteVAE(cfg)).to(device)
    cfg = model.cfg
    model.train()
    eval_set, initial, mean_color_mse = _reference_eval(
        model, images_or_dataset if eval_data is None else eval_data, batch_size, eval_batches, seed, device)
    engine = _dvae_engine(model, device, steps, lr, weight_decay, warmup_steps, grad_clip)
    stream = _batch_stream(images_or_dataset, batch_size, seed, num_workers)
    out_path = os.fspath(out_path) if out_path is not None else None

    def save(step: int, metrics: dict[str, Any]) -> None:
        if out_path is not None:
            model.save(out_path, step=step, metrics=metrics)

    t0 = time.perf_counter()
    trace = _run_steps(engine, stream, steps, log_every, save_every if out_path is not None else None, save, progress)
    elapsed = time.perf_counter() - t0

    final = evaluate_dvae(model, eval_set, device)
    k = max(1, steps // 10)
    metrics: dict[str, Any] = dict(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=str(device), time_s=elapsed,
        images_per_s=steps * batch_size / max(elapsed, 1e-9), vocab_size=cfg.vocab_size,
        recon_mse=final["recon_mse"], codes_used=final["codes_used"], perplexity=final["perplexity"],
        eval_images=final["eval_images"], initial=initial, final=final, mean_color_mse=mean_color_mse,
        train_recon_first=float(np.mean(trace.recon[:k])), train_recon_last=float(np.mean(trace.recon[-k:])),
        history=trace.history, checkpoint=out_path, config=asdict(cfg),
    )
    save(steps, metrics)
    logger.info("done in %.1fs: recon_mse %.5f (initial %.5f), codes used %d/%d, perplexity %.1f", elapsed,
                final["recon_mse"], initial["recon_mse"], final["codes_used"], cfg.vocab_size, final["perplexity"])
    return metrics
