"""Hugging Face transformers integration: seqmixers models as ``AutoModelForCausalLM`` models (the ``hf`` extra).

``SeqMixersConfig`` (a ``PretrainedConfig`` holding the fields of ``ModelConfig``) and ``SeqMixersForCausalLM`` (a
``PreTrainedModel`` and ``GenerationMixin`` around a ``LanguageModel``: any mixer, hybrids and plugin mixers
included) are registered with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` under the model type
``"seqmixers"`` when this module is imported. Generation keeps the layers' own states (recurrent states and KV
caches, ``MixerState``) in a ``SeqMixersCache``, which beam search reorders with ``MixerState.reorder``; a left
padded batch is unpadded by the model as our own batched generation does, so each row runs as its own sequence.

Only this module needs transformers: ``models`` imports without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from mixers import MixerState
from models.config import ConfigError, ModelConfig, UnknownFieldError
from models.lm import LanguageModel

MODEL_TYPE = "seqmixers"
IGNORE = -100  # the label of a position that is not trained on (transformers' and our trainer's ignore index)
FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


class SeqMixersConfig(PretrainedConfig):
    """A ``PretrainedConfig`` that takes the fields of ``ModelConfig`` (checked by it: an invalid value raises
    ``ConfigError``) besides transformers' own settings (``eos_token_id``, ``pad_token_id``, ...), which it keeps as
    transformers does; a key that is neither but looks like a misspelt field (``d_modle``) is an error naming the
    field. ``model_config()`` gives the ``ModelConfig`` back, equal to the one it was made from."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        fields = {name: kwargs.pop(name) for name in FIELDS if name in kwargs}
        if "tie_word_embeddings" in kwargs:  # transformers' name of tie_embeddings
            tie = kwargs.pop("tie_word_embeddings")
            if fields.setdefault("tie_embeddings", tie) != tie:
                raise ConfigError(
                    f"tie_word_embeddings={tie!r} contradicts tie_embeddings={fields['tie_embeddings']!r} (give one)"
                )
        for key in kwargs:
            close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.8)
            if close and not hasattr(PretrainedConfig, key):
                raise UnknownFieldError(f"unknown model config field {key!r} (did you mean {close[0]!r}?)")
        config = ModelConfig.from_dict(fields)  # validates every field
        for name, value in config.to_dict().items():
            setattr(self, name, value)
        kwargs["tie_word_embeddings"] = config.tie_embeddings  # transformers ties (and saves) the head from this
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> SeqMixersConfig:
        """From a ``ModelConfig``; ``kwargs``: transformers' settings (``eos_token_id=...``)."""
        return cls(**config.to_dict(), **kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in FIELDS})


class SeqMixersCache(Cache):
    """The layers' states (one ``MixerState`` per layer: recurrent states, KV caches, ...) as a transformers
    ``Cache``. ``get_seq_length`` is the number of input columns consumed (padding included, as transformers counts
    them); each row's own position is in its states. ``max_len``: KV caches are preallocated for that many tokens
    when the states are made (the static decode path; they grow if more come)."""

    def __init__(self, max_len: int | None = None) -> None:
        super().__init__(layers=[])
        self.states: list[MixerState] | None = None
        self.seen = 0
        self.max_len = max_len

    def __repr__(self) -> str:
        rows = None if self.states is None else self.states[0].batch_size
        return f"SeqMixersCache(seen={self.seen}, rows={rows}, max_len={self.max_len})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no limit: recurrent states have no length, KV caches grow

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False  # a recurrent state cannot forget its last tokens

    @property
    def batch_size(self) -> int:
        if self.states is None:
            raise ValueError("this SeqMixersCache holds no states yet: it has not been through the model")
        return self.states[0].batch_size

    def reset(self) -> None:
        self.states, self.seen = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SeqMixersCache cannot be cropped: recurrent states cannot forget tokens")

    def _select(self, index: Tensor) -> None:
        if self.states is not None:
            self.states = [s.reorder(index.to(s.pos.device)) for s in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows ``beam_idx`` of every layer's state, in that order (beam search), with ``MixerState.reorder``."""
        self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.states is not None:
            device = self.states[0].pos.device
            self._select(torch.arange(self.batch_size, device=device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)


class SeqMixersForCausalLM(PreTrainedModel, GenerationMixin):
    """A seqmixers ``LanguageModel`` (``self.model``) as a transformers causal LM: ``generate`` (greedy,
    sampling, beam search), ``Trainer``, ``pipeline``, ``save_pretrained`` / ``from_pretrained`` (safetensors).

    With a cache (generation), the prompt is prefilled in chunkwise mode and each new token decoded in recurrent
    mode, as ``LanguageModel.generate`` does; without one (training), the pass is parallel. ``attention_mask``
    marks real tokens (left or right padding): the model runs each row's real tokens only
    (``LanguageModel.forward(attention_mask=...)``), so positions come from the mask and the states, never from
    ``position_ids``. The loss is the sum of the next-token cross-entropies over the labels that are not -100,
    divided by their count, or by ``num_items_in_batch`` when the ``Trainer`` gives it (the targets of all the
    micro-batches of an optimizer step: the loss of a step is then the mean over its targets, as
    in our own trainer, whatever the accumulation)."""

    config_class = SeqMixersConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    accepts_loss_kwargs = True
    _is_stateful = True  # no assisted decoding: a recurrent state cannot be rolled back
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}  # when config.tie_word_embeddings
    _no_split_modules = ["Block"]

    def __init__(self, config: SeqMixersConfig) -> None:
        super().__init__(config)
        # ``from_pretrained`` builds models on the meta device; mixers keep tensors outside the parameters (rotary
        # angles, computed once in float64) that loading does not fill, so ours is built for real, then loaded.
        real = torch.device("cpu") if torch.get_default_device().type == "meta" else contextlib.nullcontext()
        with real:
            self.model = LanguageModel(config.model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: ``LanguageModel`` and its mixers initialise themselves when built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: torch.nn.Linear) -> None:
        self.model.lm_head = value

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Any = None, every_n_layers: int = 1
    ) -> None:
        """transformers' switch (``activation_checkpointing_enable``; the ``Trainer``'s ``activation_checkpointing``)
        turns on our per-block recomputation (``LanguageModel.checkpoint_blocks``); ``every_n_layers`` must be 1."""
        if enable and every_n_layers != 1:
            raise ValueError(f"seqmixers checkpoints every block: every_n_layers must be 1, got {every_n_layers}")
        self.model.checkpoint_blocks = enable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.checkpoint_blocks

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
    ) -> None:
        """A ``SeqMixersCache`` whose KV caches are preallocated for the whole generation (``max_cache_length``)."""
        if generation_config.cache_implementation is not None:
            raise ValueError(
                "seqmixers models keep their layers' own states in a SeqMixersCache: cache_implementation must be "
                f"None, got {generation_config.cache_implementation!r}"
            )
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            _check_cache(cache)
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["past_key_values"] = SeqMixersCache(max_len=max_cache_length)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: SeqMixersCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: Tensor | int | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for ``input_ids [B, T]`` continuing from ``past_key_values``, and the loss against ``labels``.

        Arguments:
            attention_mask: 0/1 ``[B, S]`` over the whole sequence so far (``S = past + T``, as ``generate`` gives
                it) or over ``input_ids`` only; the last ``T`` columns mark the real tokens of ``input_ids``.
            past_key_values: a ``SeqMixersCache`` (``None``: from scratch, a new one when ``use_cache``).
            use_cache: return the states in a ``SeqMixersCache`` (``None``: in eval mode, not while training).
            labels: ``[B, T]``, shifted here (position t's logits predict ``labels[:, t + 1]``); -100 is ignored.
            logits_to_keep: ``0``: every position's logits; ``k``: the last ``k`` positions'.
            num_items_in_batch: the loss's denominator (the ``Trainer``'s count of targets in the whole step).
        """
        for name in ("inputs_embeds", "position_ids", "output_attentions", "output_hidden_states"):
            if kwargs.get(name) not in (None, False):
                raise ValueError(f"{type(self).__name__} does not support {name}; got {type(kwargs[name]).__name__}")
        if input_ids is None:
            raise ValueError("input_ids is required ([B, T] token ids)")
        use_cache = not self.training if use_cache is None else use_cache
        if past_key_values is None and use_cache:
            past_key_values = SeqMixersCache()
        if past_key_values is not None:
            _check_cache(past_key_values)
        B, T = input_ids.shape
        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(
                    f"attention_mask must be 0/1 [B, S] with B={B} and S >= T={T} (S: the whole sequence so far), got "
                    f"shape {list(attention_mask.shape)}"
                )
            mask = attention_mask[:, -T:]
            if bool(mask.all()):
                mask = None
        states = None
        if past_key_values is not None:
            if past_key_values.states is None:
                max_len = past_key_values.max_len
                states = self.model.init_states(B, max_len=max_len) if max_len is not None else None
            else:
                states = past_key_values.states
        decoding = past_key_values is not None and past_key_values.states is not None and T == 1
        mode = "recurrent" if decoding else "chunkwise" if past_key_values is not None else "parallel"
        last_only = logits_to_keep == 1 and (mask is None or bool(mask[:, -1].all()))
        logits, new_states = self.model(input_ids, states, mode=mode, last_only=last_only, attention_mask=mask)
        if logits_to_keep and not last_only:
            logits = logits[:, -logits_to_keep:]
        if past_key_values is not None:
            past_key_values.states = new_states
            past_key_values.seen += T
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        if return_dict is False:
            return tuple(v for v in (loss, logits, past_key_values) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
    """The next-token cross-entropy (in float32) summed over the labels that are not -100, divided by their count
    or by ``num_items_in_batch``; ``logits [B, T, V]`` at position t predict ``labels [B, T]`` at t + 1."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have the shape of input_ids, {list(logits.shape[:2])}, got {list(labels.shape)} (the "
            "logits to keep must be all of them when labels are given)"
        )
    targets = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    count = (targets != IGNORE).sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, Tensor):
        count = count.to(total.device)
    return total / count


def _check_cache(cache: object) -> None:
    if not isinstance(cache, SeqMixersCache):
        raise TypeError(
            f"past_key_values must be a SeqMixersCache (it holds the layers' recurrent states and KV caches), got "
            f"{type(cache).__name__}"
        )


def transformers_tokenizer(tokenizer: Any, **special_tokens: str) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` that encodes and decodes as our BPE tokenizer (``BPETokenizer``, which it is
    made from through its ``tokenizer.json``); ``special_tokens``: ``eos_token="..."`` and so on. ``save_pretrained``
    it beside the model for ``pipeline`` and ``AutoTokenizer``. The byte tokenizer has no transformers form."""
    if getattr(tokenizer, "name", None) != "bpe":
        raise TypeError(
            f"transformers_tokenizer takes a BPETokenizer (models.training.tokenizers), got {type(tokenizer).__name__}"
        )
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save(directory)
        return PreTrainedTokenizerFast(
            tokenizer_file=str(Path(directory) / "tokenizer.json"),
            model_input_names=["input_ids", "attention_mask"],  # the model takes no token_type_ids
            **special_tokens,
        )


def from_language_model(model: LanguageModel, **kwargs: Any) -> SeqMixersForCausalLM:
    """A ``SeqMixersForCausalLM`` with ``model``'s config and a copy of its weights (``kwargs``: transformers'
    config settings, such as ``eos_token_id``)."""
    hf = SeqMixersForCausalLM(SeqMixersConfig.from_model_config(model.config, **kwargs))
    hf.model.load_state_dict(model.state_dict())
    return hf.to(device=model.device, dtype=model.dtype)


AutoConfig.register(MODEL_TYPE, SeqMixersConfig, exist_ok=True)
AutoModel.register(SeqMixersConfig, SeqMixersForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(SeqMixersConfig, SeqMixersForCausalLM, exist_ok=True)
