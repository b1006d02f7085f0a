"""Run-time messages and metrics of the command-line programs.

* :func:`cli_logging` - the context a CLI runs in: records of the package logger (``beit_fast`` and its
  children) go to stderr with time, level and logger name; while a tqdm bar is on screen they go through
  ``tqdm.write`` (tqdm's own ``logging_redirect_tqdm``), so a message never lands glued to the bar; Python
  warnings raised during the run (``SkippedImageWarning``, ...) become one-line records of the package
  logger, without the source line ``warnings`` would print. Nothing is attached to the root logger, and
  library code only ever logs (the library does not configure logging).
* :class:`TensorBoardWriter` - the run's scalars for TensorBoard (``--log_dir``, as the official BEiT
  scripts), through ``torch.utils.tensorboard``; needs the optional ``tensorboard`` package. A folder it
  cannot write (under a file, read-only, disk full) is a :class:`beit_fast.utils.run_files.RunFileError` naming it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import warnings
from typing import IO, Any, Iterator, Mapping

__all__ = ["PACKAGE_LOGGER", "LOG_FORMAT", "cli_logging", "TensorBoardWriter", "TensorBoardMissing", "bar_disable"]

PACKAGE_LOGGER = "beit_fast"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: IO[str] | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` replacement: one log record, no source line. Our own warning classes
    (e.g. ``beit_fast.data.image_folder.SkippedImageWarning``) log under their module's logger with the bare message;
    others under ``beit_fast.warnings`` with their class and origin."""
    module = getattr(category, "__module__", "") or ""
    if module == PACKAGE_LOGGER or module.startswith(PACKAGE_LOGGER + "."):
        logging.getLogger(module).warning("%s", message)
    else:
        logging.getLogger(f"{PACKAGE_LOGGER}.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                                               os.path.basename(filename), lineno)


def bar_disable(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar the caller wants (``progress``) or not: None lets tqdm drop the bar
    when its stream is not a terminal, so a log file or a pipe gets the log lines, not hundreds of ``\\r``
    updates of a bar nobody sees."""
    return None if progress else True


@contextlib.contextmanager
def cli_logging(level: int = logging.INFO, stream: IO[str] | None = None) -> Iterator[logging.Logger]:
    """Show the package's log records (``level`` and up) on ``stream`` (default: ``sys.stderr``) for the
    duration of the ``with`` block, through ``tqdm.write`` while progress bars are active, with Python
    warnings routed into the log. Everything is restored on exit; yields the package logger."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _log_warning
            with logging_redirect_tqdm(loggers=[logger]):
                yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class TensorBoardMissing(ImportError):
    """``--log_dir`` was given but the ``tensorboard`` package is not installed."""


#: TensorBoard tag group of each metric (the official BEiT scripts' ``loss/`` and ``opt/`` heads; ``val/`` for
#: fine-tuning's evaluation).
_GROUPS = {"loss": "loss", "mlm_acc": "loss", "unigram_entropy": "loss", "unigram_acc": "loss", "train_loss": "loss",
           "acc": "loss", "val_loss": "val", "top1": "val", "top5": "val", "lr": "opt", "min_lr": "opt",
           "weight_decay": "opt", "grad_norm": "opt", "loss_scale": "opt"}


class TensorBoardWriter:
    """Scalars of a run as TensorBoard events in ``log_dir``: each numeric metric of a record becomes the
    tag ``<group>/<name>`` at the given step (``loss/loss``, ``loss/mlm_acc``, ``opt/lr``, ``opt/grad_norm``,
    ..., ``perf/images_per_s``). ``purge_step``: a resumed run passes its first step, so that events a
    previous run wrote after it are dropped (as the JSON-lines log is trimmed)."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch's module imports the tensorboard package
            raise TensorBoardMissing(
                "--log_dir writes TensorBoard scalars and needs the tensorboard package: pip install tensorboard"
            ) from e
        self.log_dir = os.fspath(log_dir)
        try:
            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        except OSError as e:  # under a file, a read-only file system, disk full
            raise self._error(e) from None

    def _error(self, e: OSError) -> Exception:
        from .run_files import RunFileError

        return RunFileError(f"--log_dir {self.log_dir}: cannot write TensorBoard events there: {e.strerror or e}"
                            + (f" ({e.filename})" if getattr(e, "filename", None) else ""))

    def add_scalars(self, record: Mapping[str, Any], step: int) -> None:
        """Write every finite int/float of ``record`` (but ``step`` and ``epoch``) at ``step``."""
        for name, value in record.items():
            if name in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                try:
                    self.writer.add_scalar(f"{_GROUPS.get(name, 'perf')}/{name}", value, step)
                except OSError as e:
                    raise self._error(e) from None

    def flush(self) -> None:
        try:
            self.writer.flush()
        except OSError as e:
            raise self._error(e) from None

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as e:
            raise self._error(e) from None
