"""Training language models: the loop, its state and data, the processes that share it.

- ``loop``: ``train()``, the training loop read top to bottom, and ``train_step``.
- ``optim``, ``validation``, ``results``: AdamW and its learning-rate schedule; the validation loss and its
  perplexity; what a run returns (``TrainResult``) or raises when it diverges (``TrainingDiverged``).
- ``state``: the whole training state (``TrainState``), saved, checked and restored for ``resume``.
- ``parallel``: the torchrun process group, data parallelism (DDP, FSDP2) and context parallelism.
- ``batches``: a run's data (source, tokenizer, token cache, batches) and the record a resume checks.
- ``data``: the data pipeline: the embedded corpus, files read as documents, packing, the token cache.
- ``tokenizers``: the byte and BPE tokenizers behind one protocol.
- ``folder``, ``runlog``, ``interrupts``, ``diagnosis``: the run folder and its lock, the run log, stopping on a
  signal, and where a non-finite loss came from.

Nothing is imported here: ``models.train`` loads the loop on first use.
"""
