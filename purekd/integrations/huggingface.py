"""Adaptors for Hugging Face ``transformers`` models: no hand-written adaptor for standard models.

A ``transformers`` model returns a ``ModelOutput`` (``logits``, ``hidden_states``, ``attentions``,
``loss``, ...); :func:`hf_adaptor` turns it into purekd's adaptor vocabulary::

    adaptor = hf_adaptor(logits=True, hidden=True, attention=True, loss=True)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor)

Layer numbering follows ``transformers``: ``hidden[0]`` is the embedding output and
``hidden[k]`` the output of layer ``k`` (``num_hidden_layers + 1`` entries); ``attention[k]`` is
layer ``k + 1``'s attention probabilities ``(B, H, L, L)`` (``num_hidden_layers`` entries).

Two settings of the model decide what it returns, and the adaptor says which one is missing:

* hidden states need ``output_hidden_states=True`` (in the config or in the call);
* attention weights need ``output_attentions=True`` *and* the eager attention implementation:
  the default ``"sdpa"`` (and flash) kernels never materialise the weights and return an empty
  ``attentions`` tuple without an error. Load with ``attn_implementation="eager"``.

Causal language models (``AutoModelForCausalLM``): ``hf_adaptor(causal=True)`` aligns the logits
at position ``t`` with the token at ``t + 1`` and masks the positions whose next label is
``-100`` (prompt, padding) or past the end (:func:`purekd.stages.next_token`)::

    adaptor = hf_adaptor(causal=True)                     # logits + next-token mask
    config = purekd.DistillationConfig(kd_loss_type=["jsd", {"beta": 0.5}], temperature=1)
    step = purekd.make_step(config, teacher, student, adaptor, adaptor)

With ``lm_head=model.get_output_embeddings()`` the adaptor returns the final hidden states and
the output layer (``lm_hidden``, ``lm_weight``, ``lm_bias``) instead of the logits, and the KD
loss is computed fused, without ``(B·L, V)`` logits. Given a top-k teacher cache (a dict with
``topk_ids``, ``topk_logprobs``, ``topk_mask``) in place of the model's outputs, the adaptor
passes it on.

This module does not import ``transformers``: any object with those attributes, or a dict with
those keys, works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from purekd._keys import TOPK_KEYS
from purekd.stages import IGNORE_INDEX, next_token, shift_left

__all__ = ["HFAdaptor", "hf_adaptor"]

BatchKey = str | int | None
"""Where a tensor sits in the batch: a key of a dict batch, an index into a tuple/list batch, or
``None`` for nowhere."""

_LOAD_EAGER = (
    'load the model with attn_implementation="eager" (e.g. AutoModel.from_pretrained(path, '
    'attn_implementation="eager"), or call model.set_attn_implementation("eager") on a loaded '
    "model)"
)
_HOW_TO_PASS = (
    "set it in the model's config (from_pretrained(path, {flag}=True) or "
    "model.config.{flag} = True) or pass it to every call (step(batch, {flag}=True), "
    "distiller.train(..., {flag}=True))"
)


def _describe(outputs: Any) -> str:
    """``"SequenceClassifierOutput with fields ['loss', 'logits']"`` for messages."""
    name = type(outputs).__name__
    if isinstance(outputs, Mapping):
        return f"{name} with fields {list(outputs.keys())}"
    return name


def _field(outputs: Any, name: str) -> Any:
    """``outputs.<name>`` for a ``ModelOutput`` or an object, ``outputs[name]`` for a dict;
    ``None`` when absent."""
    if isinstance(outputs, Mapping):
        return outputs.get(name)
    return getattr(outputs, name, None)


def _check_outputs(outputs: Any) -> None:
    is_plain_sequence = isinstance(outputs, list) or (
        isinstance(outputs, tuple) and not hasattr(outputs, "_fields")
    )
    if is_plain_sequence or isinstance(outputs, Tensor):
        raise TypeError(
            f"hf_adaptor reads named fields (logits, hidden_states, attentions, loss) from a "
            f"transformers ModelOutput or a dict, but the model returned a "
            f"{type(outputs).__name__}: call it with return_dict=True (the default), or write an "
            "adaptor for the tuple"
        )


def _from_batch(batch: Any, key: BatchKey, argument: str) -> Tensor | None:
    """The tensor at ``key`` in ``batch`` (``None`` when ``key`` is ``None``)."""
    if key is None:
        return None
    if isinstance(batch, Mapping):
        if isinstance(key, int) or key not in batch:
            raise ValueError(
                f"hf_adaptor({argument}={key!r}): the batch has no key {key!r} (its keys: "
                f"{list(batch.keys())}); pass {argument}= one of those keys, or "
                f"{argument}=None if the batch has none"
            )
        value = batch[key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        if not isinstance(key, int):
            raise TypeError(
                f"hf_adaptor({argument}={key!r}): the batch is a {type(batch).__name__}, not a "
                f"dict, so it has no keys; pass {argument}= the position of that tensor in the "
                f"batch (an int), or {argument}=None"
            )
        if not -len(batch) <= key < len(batch):
            raise ValueError(
                f"hf_adaptor({argument}={key}): the batch has only {len(batch)} entries (valid "
                f"positions 0..{len(batch) - 1})"
            )
        value = batch[key]
    else:
        raise TypeError(
            f"hf_adaptor({argument}={key!r}): cannot look up {key!r} in a batch of type "
            f"{type(batch).__name__}; pass {argument}=None"
        )
    if not isinstance(value, Tensor):
        raise TypeError(
            f"hf_adaptor({argument}={key!r}): batch[{key!r}] is a {type(value).__name__}, "
            "expected a tensor"
        )
    return value


@attrs.frozen(kw_only=True)
class HFAdaptor:
    """``adaptor(batch, outputs) -> dict``: purekd's adaptor dict from a ``transformers`` output.

    Build it with :func:`hf_adaptor`; the fields say what to extract:

    * ``logits`` → ``'logits'`` = ``outputs.logits`` ``(B, C)`` or ``(B, L, C)``;
    * ``hidden`` → ``'hidden'`` = ``outputs.hidden_states`` (``hidden[0]`` = embeddings);
    * ``attention`` → ``'attention'`` = ``outputs.attentions`` (``attention[0]`` = layer 1);
    * ``loss`` → ``'losses'`` = ``outputs.loss`` when the model computed one (it does when the
      batch has ``labels``), left out otherwise;
    * ``mask_key`` → ``'inputs_mask'`` = ``batch[mask_key]`` (``None``: no mask);
    * ``logits_mask`` → ``'logits_mask'`` = the same mask, for per-token logits;
    * ``labels_key`` → ``'labels'`` = ``batch[labels_key]`` (for ``probability_shift``).
    * ``causal`` → next-token alignment: ``'logits_mask'`` keeps the positions whose next label
      is not ``ignore_index`` (and is not padding), ``'labels'`` are the labels shifted one
      position left (:func:`purekd.stages.next_token`). The labels are ``batch[labels_key]``,
      or the batch's ``'labels'`` when ``labels_key`` is ``None``; without labels the mask comes
      from the padding mask alone.
    * ``lm_head`` (the output layer, e.g. ``model.get_output_embeddings()``) → ``'lm_hidden'`` =
      ``outputs.hidden_states[-1]`` (the output layer's input; needs
      ``output_hidden_states=True``), ``'lm_weight'`` / ``'lm_bias'`` = its weight and bias, in
      place of ``'logits'``: the fused path.
    * a top-k teacher cache given as ``outputs`` (a dict with ``'topk_ids'``) → its
      ``'topk_ids'``, ``'topk_logprobs'``, ``'topk_mask'`` in place of ``'logits'``.

    A requested field the model did not return raises a ``ValueError`` that names the setting
    to change. Instances are immutable, comparable and picklable.
    """

    logits: bool = True
    hidden: bool = False
    attention: bool = False
    loss: bool = False
    mask_key: BatchKey = "attention_mask"
    logits_mask: bool = False
    labels_key: BatchKey = None
    causal: bool = False
    ignore_index: int = IGNORE_INDEX
    lm_head: Any = attrs.field(default=None, eq=False)

    def __attrs_post_init__(self) -> None:
        if self.lm_head is not None:
            weight = getattr(self.lm_head, "weight", None)
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                raise TypeError(
                    f"hf_adaptor(lm_head=...): expected the output layer, a module with a 2-d "
                    f"weight (V, H) such as model.get_output_embeddings(), got "
                    f"{type(self.lm_head).__name__}")
        if self.causal and self.logits_mask:
            raise ValueError(
                "hf_adaptor(causal=True, logits_mask=True): causal=True already returns the "
                "next-token logits mask; drop logits_mask=True")
        if not (self.logits or self.hidden or self.attention or self.loss
                or self.labels_key is not None):
            raise ValueError(
                "hf_adaptor(logits=False, hidden=False, attention=False, loss=False, "
                "labels_key=None) extracts nothing from the model: enable at least one of them"
            )
        if self.logits_mask and self.mask_key is None:
            raise ValueError(
                "hf_adaptor(logits_mask=True, mask_key=None): the logits mask is the batch's "
                "padding mask; give mask_key (e.g. 'attention_mask')"
            )

    def forward_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the model's forward needs for this adaptor: ``{}``, or with
        ``lm_head`` (the fused path) ``output_hidden_states=True`` and ``logits_to_keep`` an
        empty index tensor, so the model runs its output layer on no position at all (its
        ``logits`` are ``(B, 0, V)``; ``logits_to_keep=1`` would still form one ``(B, V)`` row
        per model and step, which the fused loss never reads). With ``loss=True`` the model
        computes its own loss on the full logits, so ``logits_to_keep`` is left out. Use it as
        ``step(batch, **adaptor.forward_kwargs())`` (one adaptor's for both models when both
        are fused)."""
        if self.lm_head is None:
            return {}
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if not self.loss:
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long)
        return kwargs

    def __call__(self, batch: Any, outputs: Any) -> dict[str, Any]:
        _check_outputs(outputs)
        adapted: dict[str, Any] = {}
        if _field(outputs, "topk_ids") is not None:  # a top-k teacher cache
            return self._cached_topk(batch, outputs)
        if self.lm_head is not None:
            adapted.update(self._output_layer(outputs))
        elif self.logits:
            adapted["logits"] = self._logits(outputs)
        if self.hidden:
            adapted["hidden"] = self._hidden(outputs)
        if self.attention:
            adapted["attention"] = self._attention(outputs)
        if self.loss:
            loss = _field(outputs, "loss")
            if loss is not None:
                self._check_full_loss(outputs, adapted)
                adapted["losses"] = loss
        mask = _from_batch(batch, self.mask_key, "mask_key")
        if mask is not None:
            adapted["inputs_mask"] = mask
            if self.logits_mask:
                adapted["logits_mask"] = mask
        labels = self._labels(batch)
        if self.causal:
            adapted.update(self._causal_mask(batch))
            if labels is not None:  # aligned with the logits: labels[:, t] is token t + 1
                adapted["labels"] = shift_left(labels, self.ignore_index)
        elif labels is not None:
            adapted["labels"] = labels
        return adapted

    def _labels(self, batch: Any) -> Tensor | None:
        if self.labels_key is None and self.causal and isinstance(batch, Mapping):
            return _from_batch(batch, "labels", "labels_key") if "labels" in batch else None
        return _from_batch(batch, self.labels_key, "labels_key")

    def _causal_mask(self, batch: Any) -> dict[str, Any]:
        if not self.causal:
            return {}
        mask = _from_batch(batch, self.mask_key, "mask_key")
        labels = self._labels(batch)
        if mask is None and labels is None:
            raise ValueError(
                "hf_adaptor(causal=True): the batch gives neither labels nor a padding mask to "
                "find the positions to distil on; pass labels_key= or mask_key=")
        return {"logits_mask": next_token(labels, mask, ignore_index=self.ignore_index).mask}

    def _cached_topk(self, batch: Any, cache: Any) -> dict[str, Any]:
        """A top-k teacher cache, passed on: every key of :data:`~purekd._keys.TOPK_KEYS` it
        holds (``topk_ids``, ``topk_logprobs``, ``topk_mask``; from a cross-tokenizer cache also
        ``topk_next_logprobs`` and ``topk_vocab_size``). A cross-tokenizer cache's rows are the
        teacher's own tokenisation, which the aligned spans index: no mask of the (student's)
        batch is attached to them."""
        adapted: dict[str, Any] = {}
        for key in TOPK_KEYS:
            value = _field(cache, key)
            if value is not None:
                adapted[key] = value
        if "topk_logprobs" not in adapted:
            raise ValueError("hf_adaptor: the teacher cache has 'topk_ids' but no "
                             "'topk_logprobs'; a top-k cache holds both")
        if "topk_next_logprobs" in adapted:  # a cross-tokenizer cache
            return adapted
        adapted.update(self._causal_mask(batch))
        mask = _from_batch(batch, self.mask_key, "mask_key")
        if mask is not None:
            adapted["inputs_mask"] = mask
        return adapted

    def _check_full_loss(self, outputs: Any, adapted: Mapping[str, Any]) -> None:
        """With the fused path the model may have computed its loss on fewer positions
        (``logits_to_keep``): that loss is not the sequence's cross-entropy."""
        logits, hidden = _field(outputs, "logits"), adapted.get("lm_hidden")
        if (isinstance(logits, Tensor) and isinstance(hidden, Tensor) and logits.dim() == 3
                and logits.size(1) != hidden.size(1)):
            raise ValueError(
                f"hf_adaptor(lm_head=..., loss=True): the model computed its loss on "
                f"{logits.size(1)} of {hidden.size(1)} positions (logits_to_keep), which is not "
                "the sequence's cross-entropy; drop loss=True (or logits_to_keep)")

    def _output_layer(self, outputs: Any) -> dict[str, Any]:
        states = _field(outputs, "hidden_states")
        if states is None or len(states) == 0:
            raise ValueError(
                f"hf_adaptor(lm_head=...): the model's output ({_describe(outputs)}) has no "
                "hidden_states, and the fused path needs the last one (the output layer's "
                "input): " + _HOW_TO_PASS.format(flag="output_hidden_states"))
        head: dict[str, Any] = {"lm_hidden": states[-1], "lm_weight": self.lm_head.weight}
        bias = getattr(self.lm_head, "bias", None)
        if isinstance(bias, Tensor):
            head["lm_bias"] = bias
        return head

    def _logits(self, outputs: Any) -> Tensor:
        logits = _field(outputs, "logits")
        if logits is None:
            raise ValueError(
                f"hf_adaptor(logits=True): the model's output ({_describe(outputs)}) has no "
                "logits; a base model without a task head (AutoModel, BertModel) has none: pass "
                "logits=False and match hidden states instead, or load a model with a head "
                "(AutoModelForSequenceClassification, ...)"
            )
        if not isinstance(logits, Tensor):
            raise TypeError(f"hf_adaptor(logits=True): outputs.logits is a "
                            f"{type(logits).__name__}, expected a tensor")
        return logits

    def _hidden(self, outputs: Any) -> tuple[Tensor, ...]:
        states = _field(outputs, "hidden_states")
        if states is None or len(states) == 0:
            raise ValueError(
                f"hf_adaptor(hidden=True): the model's output ({_describe(outputs)}) has no "
                "hidden_states: the model returns them only with output_hidden_states=True; "
                + _HOW_TO_PASS.format(flag="output_hidden_states")
            )
        return tuple(states)

    def _attention(self, outputs: Any) -> tuple[Tensor, ...]:
        weights = _field(outputs, "attentions")
        if weights is None:
            raise ValueError(
                f"hf_adaptor(attention=True): the model's output ({_describe(outputs)}) has no "
                "attentions: the model returns attention weights only with "
                "output_attentions=True and the eager attention implementation. "
                f"{_LOAD_EAGER[0].upper()}{_LOAD_EAGER[1:]}, and for output_attentions=True "
                + _HOW_TO_PASS.format(flag="output_attentions")
            )
        if len(weights) == 0 or any(w is None for w in weights):
            raise ValueError(
                f"hf_adaptor(attention=True): the model returned no attention weights "
                f"(outputs.attentions is {_short(weights)}): its attention implementation "
                "(the default 'sdpa', or flash attention) does not compute them, even with "
                f"output_attentions=True. To distil attention, {_LOAD_EAGER}, and keep "
                "output_attentions=True"
            )
        return tuple(weights)


def _short(weights: Sequence[Any]) -> str:
    if len(weights) == 0:
        return "()"
    return f"a tuple of {len(weights)} with {sum(w is None for w in weights)} None"


def hf_adaptor(
    *,
    logits: bool = True,
    hidden: bool = False,
    attention: bool = False,
    loss: bool = False,
    mask_key: BatchKey = "attention_mask",
    logits_mask: bool = False,
    labels_key: BatchKey = None,
    causal: bool = False,
    ignore_index: int = IGNORE_INDEX,
    lm_head: Any = None,
) -> HFAdaptor:
    """An adaptor for a ``transformers`` model: ``adaptor(batch, outputs) -> dict``.

    Args:
        logits: return ``outputs.logits`` as ``'logits'`` (models with a task head).
        hidden: return ``outputs.hidden_states`` as ``'hidden'``; needs
            ``output_hidden_states=True``. ``hidden[0]`` is the embedding output.
        attention: return ``outputs.attentions`` as ``'attention'``; needs
            ``output_attentions=True`` and ``attn_implementation="eager"``.
        loss: return ``outputs.loss`` as ``'losses'`` (for ``hard_label_weight``) when the model
            computed it, i.e. when the batch carries ``labels``.
        mask_key: where the padding mask is in the batch — a key of a dict batch (default
            ``'attention_mask'``), an index into a tuple batch, or ``None`` for no mask. It
            becomes ``'inputs_mask'``, which the intermediate matches use.
        logits_mask: return the same mask as ``'logits_mask'`` (token-level logits ``(B, L, C)``).
        labels_key: where the labels are in the batch, returned as ``'labels'`` (for
            ``probability_shift``); ``None`` (default) leaves them out (with ``causal=True``:
            the batch's ``'labels'`` when it has them).
        causal: a causal LM: the logits at position ``t`` are distilled toward the token at
            ``t + 1``; ``'logits_mask'`` keeps the positions whose next label is not
            ``ignore_index`` and is not padding; ``'labels'`` are shifted one position left.
        ignore_index: the label of ignored positions (``-100``, as ``transformers``).
        lm_head: the output layer (``model.get_output_embeddings()``): return the last hidden
            state and the layer's weight and bias (``'lm_hidden'``, ``'lm_weight'``,
            ``'lm_bias'``) instead of the logits, for the fused KD path; needs
            ``output_hidden_states=True``. Pass ``logits_to_keep`` to the forward as well so
            the model does not compute the full logits itself: :meth:`HFAdaptor.forward_kwargs`
            gives both (``step(batch, **adaptor.forward_kwargs())``; ``logits_to_keep=1``
            works too, at the cost of one ``(B, V)`` row per model and step).

    Example::

        teacher = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="eager", output_hidden_states=True, output_attentions=True)
        adaptor = hf_adaptor(logits=True, hidden=True, attention=True, loss=True)
        step = purekd.make_step(config, teacher, student, adaptor, adaptor)
    """
    return HFAdaptor(logits=logits, hidden=hidden, attention=attention, loss=loss,
                     mask_key=mask_key, logits_mask=logits_mask, labels_key=labels_key,
                     causal=causal, ignore_index=ignore_index, lm_head=lm_head)
