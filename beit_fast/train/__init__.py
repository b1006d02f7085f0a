"""The training layer: one engine and one loop for every kind of training.

* :mod:`.engine` - :class:`Engine`: one optimizer step of a *task module* (model + loss as one module,
  ``forward(*inputs) -> (loss, metric)``): schedules, autocast / loss scaling, accumulation, clipping,
  the non-finite policy, DDP / FSDP2, ``torch.compile``.
* :mod:`.mim` - the pretraining task on it: visual tokens of a frozen tokenizer, the fast static-shape step.
"""
