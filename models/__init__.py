"""seqmixers models: blocks, the model builder and the language model (built on ``mixers``)."""
