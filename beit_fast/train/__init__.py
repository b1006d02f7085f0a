"""The training layer: one engine and one loop for every kind of training.

* :mod:`.engine` - :class:`Engine`: one optimizer step of a *task module* (model + loss as one module,
  ``forward(*inputs) -> (loss, metric)``, :mod:`beit_fast.train.loss`): schedules, autocast / loss scaling,
  accumulation, clipping, the non-finite policy (checked on the host or on the device), DDP / FSDP2,
  ``torch.compile``.
* :mod:`.loop` - :class:`TrainLoop`: epochs, progress, JSON lines + TensorBoard, checkpoints and exact resume
  (:mod:`.loop_state`, :mod:`.run_dir`), graceful stop, distributed stop; :mod:`.meters`, :mod:`.feed`; what
  keeps a GPU fed: :mod:`.device_feed` (uint8 batches to the device, one ahead), :mod:`.host_reads` (the
  counted host reads), :mod:`.checkpoint_writer` (background saves), :mod:`.epoch_seeds` (persistent workers).
* The runs on them: :mod:`.pretraining` (+ :mod:`.pretraining_setup`, :mod:`.mim`: visual tokens and the fast
  static-shape step), :mod:`.finetuning` (+ :mod:`.classification_setup`), :mod:`.probing` (linear probes),
  :mod:`.evidence` (pretraining vs random init on the digits); the dVAE tokenizer's training
  (:mod:`beit_fast.train.dvae`: the engine under its own short step loop).
"""
