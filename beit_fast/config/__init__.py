"""Run configurations: one dataclass per training command line, built from its flags.

Plain Python (no torch): a CLI parses its flags (argparse, whose defaults come from these dataclasses),
builds the config with :func:`from_args`, validates it (every problem named by its flag, all at once) and
hands it to the library's run function. Python callers build the same dataclasses directly.

* :class:`PretrainConfig` - ``python -m beit_fast.pretrain`` / :func:`beit_fast.train.pretraining.pretrain`
* :class:`FinetuneConfig` - ``python -m beit_fast.finetune`` / :func:`beit_fast.train.finetuning.finetune`
* :class:`ProbeConfig` - ``python -m beit_fast.linear_probe`` / :func:`beit_fast.train.probing.run_linear_probe`
* :class:`EvidenceConfig` - ``python -m beit_fast.evidence`` / :func:`beit_fast.train.evidence.run_evidence`
* :class:`TokenizerConfig` - ``python -m beit_fast.train_tokenizer`` /
  :func:`beit_fast.train.tokenizer_training.run_tokenizer_training`
"""
from .base import FLOAT32_MAX, adamw_first_step, defaults_of, exit_on_problems, from_args
from .evidence import EVIDENCE_VARIANTS, EvidenceConfig
from .finetune import FinetuneConfig
from .pretrain import PretrainConfig
from .probe import ProbeConfig
from .tokenizer import TokenizerConfig

__all__ = ["from_args", "defaults_of", "exit_on_problems", "adamw_first_step", "FLOAT32_MAX", "PretrainConfig",
           "FinetuneConfig", "ProbeConfig", "EvidenceConfig", "EVIDENCE_VARIANTS", "TokenizerConfig"]
