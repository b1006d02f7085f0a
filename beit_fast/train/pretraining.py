"""BEiT pretraining as a run: :func:`pretrain` (what ``python -m beit_fast.pretrain`` calls).

data -> masking / tokenizer -> model -> loss -> engine -> loop -> checkpoints: the pieces come from
:mod:`beit_fast.train.pretraining_setup`, the steps from :class:`~beit_fast.train.mim.PretrainEngine` (the
eager reference) or :class:`~beit_fast.train.mim.FastPretrainEngine`, the epochs, logs, checkpoints, resume and
graceful stop from :class:`~beit_fast.train.loop.TrainLoop`. Multi-process runs join the process group
torchrun started (DDP, or FSDP2 with ``fsdp``). Problems are ``SystemExit("error: ...")``, as the command line
prints them.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ..utils.checkpoint import CheckpointError, atomic_write_text
from .checkpoint_folder import Checkpointer
from ..config import PretrainConfig, exit_on_problems
from .loop import EpochEnd, LoopConfig, LoopHooks, NonFiniteLossError, TrainLoop
from .pretraining_setup import (build_pretrain_data, build_pretrain_engine, build_pretrain_model,
                                build_tokenizer_for_run, choose_tokenizer_precision)
from .run_dir import choose_resume_state, claim_output_dir

__all__ = ["pretrain"]

log = logging.getLogger("beit_fast.pretrain")


def pretrain(cfg: PretrainConfig) -> dict:
    """Run pretraining with ``cfg`` (demo / real defaults filled in, validated); returns the summary:
    ``steps``, ``minutes``, ``checkpoint``, ``history`` (the logged step records), ``interrupted`` (why it
    stopped early, or None), ``best_loss`` / ``best_epoch`` (lowest epoch-mean loss), ``epoch_losses``,
    ``world_size``, ``unigram_entropy`` / ``unigram_acc`` (the baseline of the masked targets seen)."""
    from .distributed import cleanup_distributed, init_distributed

    cfg = cfg.resolved()
    exit_on_problems(cfg.problems())
    dist_info, device = init_distributed(cfg.device)
    if cfg.demo:
        from .engine import demo_cpu_threads

        demo_cpu_threads(device)
    lock = None
    try:
        try:
            lock = claim_output_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite_output_dir,
                                    dist_info=dist_info)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
        return _run(cfg, dist_info, device)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed(dist_info)


def _amp_dtype(cfg: PretrainConfig, dist_info, device: torch.device) -> torch.dtype | None:
    """Problems that need the device or the launch, before any work."""
    from .engine import resolve_amp_dtype

    if cfg.fsdp and not dist_info.active:
        raise SystemExit("error: --fsdp needs a distributed launch: torchrun --nproc_per_node=N -m beit_fast.pretrain ...")
    try:
        amp_dtype = resolve_amp_dtype(cfg.amp, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.fp8:
        from ..model.fp8 import fp8_unavailable_reason

        on_fast = cfg.fast == "on" or (cfg.fast == "auto" and device.type == "cuda")
        why = fp8_unavailable_reason(device) if on_fast else "it needs the fast step, which --fast auto uses only on CUDA"
        if why is not None:
            raise SystemExit(f"error: --fp8: {why}")
    return amp_dtype


class _PretrainHooks(LoopHooks):
    """Pretraining's part of the loop: the data set's epoch (augmentation seeds), what checkpoints and step
    records add (model config, flags, tokenizer; skipped images, the unigram baseline, memory), and the epoch
    mean loss as the score of checkpoint-best.pt."""

    def __init__(self, cfg: PretrainConfig, model_config: dict, engine, data, tokenizer_sha256: str) -> None:
        self.cfg, self.model_config, self.engine, self.data = cfg, model_config, engine, data
        self.tokenizer_sha256 = tokenizer_sha256
        self.loop: TrainLoop | None = None

    def start_epoch(self, epoch: int) -> None:
        self.data.dataset.set_epoch(epoch)

    def checkpoint_extras(self) -> dict:
        return {"model_config": self.model_config, "args": asdict(self.cfg),
                "tokenizer": {"kind": self.cfg.tokenizer, "path": self.cfg.discrete_vae_weight_path,
                              "sha256": self.tokenizer_sha256}}

    def step_record_extras(self) -> dict:
        extras = {"skipped_images": self.data.loader.skipped.num_skipped}
        extras["unigram_entropy"], extras["unigram_acc"] = self.engine.unigram_baseline() or (None, None)
        rss = _rss_mb()
        if rss is not None:
            extras["rss_mb"] = rss
        return extras

    def end_epoch(self, epoch: int, train_loss: float) -> EpochEnd:
        records = self.loop.step_records if self.loop is not None else []
        speed = f", last {records[-1]['images_per_s']:.1f} img/s" if records else ""
        return EpochEnd(score=train_loss, message=f"epoch {epoch}/{self.cfg.epochs}: mean loss {train_loss:.4f} nats "
                        f"(unigram baseline {_nats(self.engine.unigram_entropy())}){{best}}{speed}")


def _run(cfg: PretrainConfig, dist_info, device: torch.device) -> dict:
    from ..utils.rng import seed_everything

    is_main, world = dist_info.is_main, dist_info.world_size
    if not is_main:  # one rank speaks
        logging.getLogger("beit_fast").setLevel(logging.WARNING)
    amp_dtype = _amp_dtype(cfg, dist_info, device)
    if device.type == "cuda":  # fixed shapes: cuDNN picks the fastest convolutions (the tokenizer's) once
        torch.backends.cudnn.benchmark = True
    cfg.world_size = world
    cfg.global_batch_size = cfg.batch_size * world * cfg.update_freq
    seed_everything(cfg.seed)
    data = build_pretrain_data(cfg, dist_info, device)
    tokenizer = build_tokenizer_for_run(cfg, device, dist_info)
    model = build_pretrain_model(cfg, tokenizer, device, dist_info.rank)
    engine, fast = build_pretrain_engine(cfg, model, tokenizer, device, dist_info, amp_dtype, data.steps_per_epoch)
    choose_tokenizer_precision(cfg, engine, data.dataset, device)
    if cfg.tokenize_in_loader:
        data.loader.set_tokenizer(tokenizer, engine.tokenizer_dtype)
    from ..tokenizer.identity import weights_sha256

    hooks = _PretrainHooks(cfg, model.cfg.to_dict(), engine, data, weights_sha256(tokenizer))
    loop = TrainLoop(engine, data.loader, data.sampler, LoopConfig(
        epochs=cfg.epochs, steps_per_epoch=data.steps_per_epoch, update_freq=cfg.update_freq, batch_size=cfg.batch_size,
        images_per_step=cfg.global_batch_size, log_freq=cfg.log_freq, save_ckpt_freq=cfg.save_ckpt_freq,
        save_ckpt_steps=cfg.save_ckpt_steps, keep_last=cfg.keep_last, max_bad_steps=cfg.max_bad_steps,
        stop_after_steps=cfg.stop_after_steps, progress=not cfg.no_progress, seed=cfg.seed,
        nonfinite_hint="Lower --lr, use --amp bf16/none, or check that the masks mask patches."),
        hooks, output_dir=cfg.output_dir, checkpointer=Checkpointer(cfg.output_dir, keep_last=cfg.keep_last)
        if is_main else None, log_dir=cfg.log_dir, dist_info=dist_info, device=device)
    hooks.loop = loop
    _resume(cfg, loop, model.cfg.to_dict(), dist_info, hooks.tokenizer_sha256)
    log.info("model %s: %.2fM parameters, vocab %d, device %s, amp %s, step %s, %s", cfg.model,
             sum(p.numel() for p in model.parameters()) / 1e6, model.cfg.vocab_size, device, engine.amp_dtype,
             "fast" if fast else "eager reference",
             {"none": "1 process", "ddp": f"DDP x {world}", "fsdp": f"FSDP2 x {world}"}[engine.parallel])
    log.info("data: %s, %d samples, %d steps/epoch x %d epochs = %d steps of %d images (%d per process x %d "
             "micro-batches x %d processes); %s; --data_pipeline %s", type(data.dataset.images).__name__,
             len(data.dataset), data.steps_per_epoch, cfg.epochs, data.steps_per_epoch * cfg.epochs,
             cfg.global_batch_size, cfg.batch_size, cfg.update_freq, world, data.masking, cfg.data_pipeline)
    if is_main:
        try:  # atomically: a link planted under the name is replaced, never followed
            atomic_write_text(Path(cfg.output_dir) / "args.json", json.dumps(asdict(cfg), indent=1, default=str))
        except CheckpointError as e:
            raise SystemExit(f"error: {e}") from None
    return _summary(_train(loop), engine, data.loader)


def _train(loop: TrainLoop) -> dict:
    from ..utils.logs import TensorBoardMissing

    try:
        return loop.run()
    except (TensorBoardMissing, NonFiniteLossError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None


def _resume(cfg: PretrainConfig, loop: TrainLoop, model_config: dict, dist_info, tokenizer_sha256: str) -> None:
    if not cfg.resume:
        return
    try:
        state = choose_resume_state(cfg.resume, cfg.output_dir, trust_pickle=cfg.trust_pickle, dist_info=dist_info)
        if state is not None and state.get("model_config") != model_config:
            raise SystemExit(f"error: checkpoint {state['_path']} was written for another model config: "
                             f"{_config_difference(state.get('model_config'), model_config)}")
        if state is not None:
            _check_tokenizer_identity(state, cfg, tokenizer_sha256)
            _warn_if_trajectory_changes(state, cfg)
        loop.restore(state)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None


def _summary(result: dict, engine, loader) -> dict:
    if loader.skipped.num_skipped:
        log.warning("%d unreadable images were skipped: %s", loader.skipped.num_skipped,
                    ", ".join(list(loader.skipped.files)[:5]))
    summary = {"steps": result["steps"], "minutes": result["minutes"], "checkpoint": result["checkpoint"],
               "history": result["step_records"], "interrupted": result["interrupted"], "best_loss": result["best"],
               "best_epoch": result["best_epoch"], "epoch_losses": result["epoch_losses"],
               "world_size": result["world_size"]}
    summary["unigram_entropy"], summary["unigram_acc"] = engine.unigram_baseline() or (None, None)
    history = summary["history"]
    if history:
        log.info("done: %d steps in %.1f min; MIM loss %.4f -> %.4f nats, mlm_acc %.4f -> %.4f; unigram baseline "
                 "(masked tokens predicted by their frequency alone): loss %s, accuracy %s; checkpoint %s",
                 summary["steps"], summary["minutes"], history[0]["loss"], history[-1]["loss"],
                 history[0]["mlm_acc"], history[-1]["mlm_acc"], _nats(summary["unigram_entropy"]),
                 "n/a" if summary["unigram_acc"] is None else f"{summary['unigram_acc']:.4f}", summary["checkpoint"])
    return summary


def _nats(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f} nats"


def _rss_mb() -> float | None:
    """Resident memory of this process in MiB (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def _config_difference(old: dict | None, new: dict) -> str:
    """``key: checkpoint X, this run Y`` for each key whose value differs (a key missing on one side: -)."""
    old = old if isinstance(old, dict) else {}
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k, "-") != new.get(k, "-")]
    return "; ".join(f"{k}: checkpoint {old.get(k, '-')!r}, this run {new.get(k, '-')!r}" for k in keys)


def _check_tokenizer_identity(state: dict, cfg: PretrainConfig, sha256: str) -> None:
    """The checkpoint records the SHA-256 of its tokenizer's weights: other weights (a file retrained at the same
    path, another file) would silently change the MIM targets, so resuming with them is refused unless
    ``--allow_tokenizer_change``. Checkpoints without the record (older ones) are resumed with a note."""
    tok = state.get("tokenizer") if isinstance(state.get("tokenizer"), dict) else {}
    recorded = tok.get("sha256")
    if recorded is None:
        log.info("%s records no tokenizer identity: cannot check that %s is the tokenizer it was trained with",
                 state["_path"], cfg.discrete_vae_weight_path)
        return
    if recorded == sha256:
        return
    what = (f"checkpoint {state['_path']} was trained with the tokenizer {tok.get('path')} (weights SHA-256 "
            f"{str(recorded)[:16]}...), this run's tokenizer {cfg.discrete_vae_weight_path} has other weights (SHA-256 "
            f"{sha256[:16]}...)")
    if not cfg.allow_tokenizer_change:
        raise SystemExit(f"error: {what}: resuming would change the MIM targets. Resume with the original tokenizer, "
                         "or pass --allow_tokenizer_change if that is intended")
    log.warning("%s; --allow_tokenizer_change: the MIM targets change from step %s on", what, state.get("step"))


def _warn_if_trajectory_changes(state: dict, cfg: PretrainConfig) -> None:
    old = state.get("args") or {}
    old_global = old.get("global_batch_size", old.get("batch_size"))
    if old_global is not None and old_global != cfg.global_batch_size:
        log.warning("the checkpoint was trained with a global batch of %s, this run uses %d: the data order and "
                    "the schedules continue from step %d but do not follow the original run", old_global,
                    cfg.global_batch_size, int(state["step"]))
    for key in ("seed", "epochs", "lr", "tokenizer"):
        if key in old and old[key] != getattr(cfg, key):
            log.warning("resuming with --%s %s (the checkpoint's run used %s)", key, getattr(cfg, key), old[key])
    tok = state.get("tokenizer") or {}
    if tok.get("path") and cfg.discrete_vae_weight_path and \
            os.path.abspath(tok["path"]) != os.path.abspath(cfg.discrete_vae_weight_path):
        log.warning("resuming with tokenizer %s; the checkpoint was trained with %s", cfg.discrete_vae_weight_path,
                    tok["path"])
