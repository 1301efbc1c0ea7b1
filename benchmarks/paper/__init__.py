"""The RetNet paper's tables (Sun et al. 2023; ``PAPER.md``) reproduced in miniature, with one command.

``python -m benchmarks.paper [--quick] [--only PART ...] [--text FILE] [--seeds ...] [--out DIR]`` runs four
parts, one module each, and writes ``PART.json`` (the numbers, the machine, the date), ``PART.md`` (the table) and,
through ``benchmarks.paper.plot`` (which reads the JSON alone), ``PART.png``:

- ``ablations``: the paper's ablation table (gate, GroupNorm, decay, multi-scale decay, head dimension, and the
  paper's decay schedule beside the code's);
- ``comparison``: the paper's mixer comparison, in spirit: validation perplexity and MQAR accuracy of every
  mixer at matched parameter counts;
- ``training_cost``: tokens/s and peak memory of a training step against the sequence length;
- ``inference_cost``: decode latency, throughput against the batch size, and state against KV-cache memory.

See docs/paper.md for what each part measures and what this scale can and cannot say.
"""
