"""Name → function maps with TextBrewer's names, and :func:`register_new` to extend them.

Part of the TextBrewer-compatible facade, but plain data on layers 1–2: it imports only the
losses, the schedules and the projections (the adaptor key names live in the leaf
``purekd._keys`` and are re-exported here), so the configs and ``make_step`` may read it.

These are what configs refer to by name: ``kd_loss_type='ce'``, ``'loss': 'hidden_mse'``,
``'proj': ['linear', 384, 768]``, ``kd_loss_weight_scheduler='linear_decay'``,
``temperature_scheduler=['flsw', 1, 2]``. An unknown name raises a :class:`ValueError` that
lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

from purekd import losses, projections, schedules
from purekd._keys import ADAPTOR_KEYS, FEATURES, LM_KEYS, TOPK_KEYS
from purekd.losses import _divergences
from purekd.losses._gold_parameters import GOLD_DEFAULTS, check_gold_parameters


class UnknownNameError(ValueError, KeyError):
    """A name that is not in a preset map; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PresetMap(MutableMapping[str, Callable[..., Any]]):
    """A dict of named functions whose missing keys raise :class:`UnknownNameError`."""

    def __init__(self, title: str, entries: Mapping[str, Callable[..., Any]]):
        self.title = title
        self._entries: dict[str, Callable[..., Any]] = dict(entries)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.title} {name!r}; valid names: {sorted(self)}"
            ) from None

    def __setitem__(self, name: str, func: Callable[..., Any]) -> None:
        self._entries[name] = func

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r}, {sorted(self._entries)})"


class BuilderMap(PresetMap):
    """A preset map whose keys may carry arguments: ``m['name']`` or ``m[['name', *args]]``.

    Entries registered as builders (in ``builders``) must be given their arguments and return
    the function to use: ``TEMPERATURE_SCHEDULER[['flsw', 1, 2]]`` is ``flsw(1, 2)``. Any other
    entry given arguments is called with them too (as TextBrewer does for entries added with
    :func:`register_new`). A list whose last element is a dict passes it as keyword arguments.
    """

    def __init__(
        self,
        title: str,
        entries: Mapping[str, Callable[..., Any]],
        builders: Mapping[str, str],
    ):
        super().__init__(title, entries)
        self.builders = dict(builders)  # name -> its argument description, for errors

    def __getitem__(self, key: Any) -> Callable[..., Any]:
        if isinstance(key, (list, tuple)):
            if not key:
                raise UnknownNameError(f"empty {self.title}; valid names: {sorted(self)}")
            name, args = key[0], list(key[1:])
            builder = super().__getitem__(name)
            if name not in self.builders and not args:
                return builder
            kwargs: dict[str, Any] = args.pop() if args and isinstance(args[-1], dict) else {}
            try:
                return builder(*args, **kwargs)
            except TypeError as error:
                wanted = self.builders.get(name, "its builder's arguments")
                raise ValueError(
                    f"{self.title} {name!r} needs arguments {wanted}, got "
                    f"{list(key[1:])!r}: write [{name!r}, {wanted}] ({error})"
                ) from None
        if key in self.builders:
            raise ValueError(
                f"{self.title} {key!r} needs arguments: write [{key!r}, {self.builders[key]}]"
            )
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        name = key[0] if isinstance(key, (list, tuple)) and key else key
        return isinstance(name, str) and name in self._entries


class KDLossMap(PresetMap):
    """:data:`KD_LOSS_MAP`: TextBrewer's ``'ce'`` and ``'mse'`` and the losses added with
    :func:`register_new` (TextBrewer's meaning: ``fn(logits_S, logits_T, temperature)``, per
    batch), in front of a live view of the divergences registered in :mod:`purekd.losses`
    (:func:`~purekd.losses.register_divergence`): a name registered there is a name here."""

    def _divergences(self) -> dict[str, Callable[..., Any]]:
        return {name: losses.divergence(name) for name in registered_divergences()}

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if isinstance(name, str) and name not in self._entries and name in self._divergences():
            return losses.divergence(name)
        return super().__getitem__(name)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]  # a registered divergence: losses.unregister_divergence

    def __iter__(self) -> Iterator[str]:
        return iter({**dict.fromkeys(self._entries), **dict.fromkeys(registered_divergences())})

    def __len__(self) -> int:
        return len(set(self._entries) | set(registered_divergences()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or
                                          name in registered_divergences())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.title!r}, {sorted(self)})"


def registered_divergences() -> list[str]:
    """The names of the token-level divergences (:func:`~purekd.losses.register_divergence`)."""
    return _divergences.names()


KD_LOSS_MAP = KDLossMap("kd_loss_type", {"ce": losses.kd_ce, "mse": losses.kd_mse,
                                        "sampled_reverse_kl": losses.sampled_reverse_kl,
                                        "gold": losses.aligned_gold})
"""Logits KD losses: TextBrewer's ``'ce'`` (soft cross-entropy) and ``'mse'``, the
token-level divergences of :data:`TOKEN_KD_LOSSES`, and the sampled-token loss of
:data:`SAMPLED_KD_LOSSES` (on-policy only), and the cross-tokenizer loss of
:data:`CROSS_TOKENIZER_KD_LOSSES`."""

SAMPLED_KD_LOSSES: dict[str, dict[str, Any]] = {"sampled_reverse_kl": {"gamma": 0.0}}
"""Losses on *sampled* tokens (on-policy distillation, ``DistillationConfig(on_policy=...)``):
estimators from each model's log-probability of the sampled tokens, not divergences of two
full distributions, so they are not in :data:`TOKEN_KD_LOSSES` (nor in the divergence
registry). Each with its parameters and defaults; ``gamma`` in [0, 1]
(:func:`~purekd.losses.sampled_reverse_kl`)."""


def _sampled_parameters(name: str, rest: list[Any], value: Any, field: str) -> dict[str, Any]:
    """The parameters of a sampled-token loss given as ``[name, *positional, {keyword: v}]``."""
    order = list(SAMPLED_KD_LOSSES[name])
    keywords: dict[str, Any] = dict(rest.pop()) if rest and isinstance(rest[-1], Mapping) else {}
    if len(rest) > len(order) or set(keywords) - set(order):
        raise ValueError(f"{field}={list(value)!r}: {name!r} takes the parameter(s) {order}")
    params = {**dict(zip(order, rest, strict=False)), **keywords}
    gamma = params.get("gamma", 0.0)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"{field}={list(value)!r}: gamma must be in [0, 1] (the discount of "
                         f"the sampled-token advantage over later tokens), e.g. "
                         f"[{name!r}, {{'gamma': 0.0}}]")
    return params


# -- cross-tokenizer distillation (issue 20) ---------------------------------------------------
CROSS_TOKENIZER_KD_LOSSES: dict[str, dict[str, Any]] = {"gold": dict(GOLD_DEFAULTS)}
"""Losses over the aligned spans of two tokenisations (a teacher and a student with different
tokenizers; docs/cross-tokenizer.md): not a divergence of two distributions over one
vocabulary, so not in :data:`TOKEN_KD_LOSSES` (nor in the divergence registry). Each with its
parameters and defaults (:func:`~purekd.losses.aligned_gold`): ``loss``, the divergence on the
matched tokens (a name of :data:`TOKEN_KD_LOSSES`), and that divergence's own parameters
(``beta`` for ``"jsd"``); ``matched_weight`` / ``unmatched_weight`` (both or neither, numbers
>= 0); ``top_k`` (the ULD part's sorted head). ``"uld"`` is in :data:`TOKEN_KD_LOSSES` (one
tokenizer, row against row) and runs over the spans when the batch carries them."""


def _gold_parameters(name: str, rest: list[Any], value: Any, field: str) -> dict[str, Any]:
    """The parameters of a cross-tokenizer loss, ``[name, {keyword: value}]``, validated."""
    given = f"{field}={list(value)!r}"
    if len(rest) != 1 or not isinstance(rest[0], Mapping):
        raise ValueError(f"{given}: {name!r} takes its parameters as one dict, e.g. "
                         f"[{name!r}, {{'loss': 'jsd', 'beta': 0.5}}]")
    return check_gold_parameters(rest[0], given)


class _TokenKDLosses(Mapping[str, dict[str, Any]]):
    """Live view: each registered divergence's parameters with their defaults, then ``tail``
    (False) for those with a top-k form."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in registered_divergences():
            raise KeyError(name)
        entry = _divergences.declared(name, "TOKEN_KD_LOSSES")
        return {**entry.defaults, **({"tail": False} if entry.topk else {})}

    def __iter__(self) -> Iterator[str]:
        return iter(registered_divergences())

    def __len__(self) -> int:
        return len(registered_divergences())

    def __repr__(self) -> str:
        return repr(dict(self))


class _TopkForms(Mapping[str, str]):
    """Live view: ``{divergence: its top-k loss}``."""

    def __getitem__(self, name: str) -> str:
        forms = _divergences.topk_forms()
        if name not in forms or name not in registered_divergences():
            raise KeyError(name)
        return forms[name]

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in _divergences.topk_forms() if n in registered_divergences()])

    def __len__(self) -> int:
        return len(list(iter(self)))

    def __repr__(self) -> str:
        return repr(dict(self))


TOKEN_KD_LOSSES: Mapping[str, dict[str, Any]] = _TokenKDLosses()
"""The token-level divergences (``kd_loss_type`` names), each with its parameters and their
defaults, in positional order — derived from the registry of :mod:`purekd.losses` (see the
table in docs/losses.md). ``tail`` (True/False) is the top-k form's extra bucket for the
teacher's remaining mass, used with a top-k teacher only. Give parameters as
``kd_loss_type=['jsd', {'beta': 0.9}]`` or ``['jsd', 0.9]``."""

TOPK_FORMS: Mapping[str, str] = _TopkForms()
"""The token-level divergences with a top-k form (a teacher's ``topk_ids``/``topk_logprobs``),
and the name of that form (:func:`purekd.losses._topk.topk_loss`)."""


def _check_kd_parameters(name: str, params: dict[str, Any], value: Any, field: str) -> None:
    given = f"{field}={list(value)!r}"
    tail = params.pop("tail", False)
    if not isinstance(tail, bool):
        raise TypeError(f"{given}: tail must be True or False")
    try:
        _divergences.parameters(name, "", params)
    except (ValueError, TypeError) as error:
        defaults = dict(_divergences.declared(name, field).defaults)
        reason = str(error).removeprefix(": ")
        raise type(error)(f"{given}: {reason}; e.g. [{name!r}, {defaults}]") from None
    if tail:
        params["tail"] = True


def kd_loss_spec(value: Any, field: str = "kd_loss_type") -> tuple[str, dict[str, Any]]:
    """``(name, parameters)`` of a ``kd_loss_type``: a name of :data:`KD_LOSS_MAP`, or
    ``[name, *positional, {keyword: value}]`` for a token-level divergence with parameters.
    Raises ``ValueError`` / ``TypeError`` naming the field, the value and the fix."""
    if isinstance(value, str):
        KD_LOSS_MAP[value]  # unknown name: UnknownNameError listing the valid ones
        return value, {}
    if not isinstance(value, (list, tuple)) or not value or not isinstance(value[0], str):
        raise TypeError(f"{field}={value!r}: give a name, e.g. 'forward_kl', or a name with its "
                        f"parameters, e.g. ['jsd', {{'beta': 0.9}}]")
    name, rest = value[0], list(value[1:])
    KD_LOSS_MAP[name]
    if name in SAMPLED_KD_LOSSES:
        return name, _sampled_parameters(name, rest, value, field)
    if name in CROSS_TOKENIZER_KD_LOSSES:
        return name, _gold_parameters(name, rest, value, field)
    if name not in TOKEN_KD_LOSSES:
        raise ValueError(f"{field}={list(value)!r}: {name!r} takes no parameters; parameters go "
                         f"with the token-level losses {sorted(TOKEN_KD_LOSSES)}")
    order = list(TOKEN_KD_LOSSES[name])
    keywords: dict[str, Any] = dict(rest.pop()) if rest and isinstance(rest[-1], Mapping) else {}
    if len(rest) > len(order):
        raise ValueError(f"{field}={list(value)!r}: {name!r} takes at most {len(order)} "
                         f"parameter(s) {order}, got {len(rest)} positional")
    params = dict(zip(order, rest, strict=False))
    for key, item in keywords.items():
        if key not in order:
            raise ValueError(f"{field}={list(value)!r}: {name!r} has no parameter {key!r}; its "
                             f"parameters: {order or 'none'}")
        if key in params:
            raise ValueError(f"{field}={list(value)!r}: {key!r} given twice")
        params[key] = item
    given = dict(params)
    _check_kd_parameters(name, params, value, field)
    return name, given

MATCH_LOSS_MAP = PresetMap("intermediate match loss", losses.MATCH_LOSSES)
"""Intermediate-feature losses, each ``(feature_S, feature_T, mask=None) -> Tensor``."""

PAIR_LOSSES: frozenset[str] = frozenset({"gram", "fsp", "mmd", "nst"})
"""Match losses that compare a pair of layers: ``layer_T`` and ``layer_S`` are two-element lists."""

PROJ_MAP = PresetMap(
    "projection",
    {"linear": projections.linear, "relu": projections.relu, "tanh": projections.tanh},
)
"""Projection builders ``(dim_in, dim_out) -> nn.Module``."""

WEIGHT_SCHEDULER = PresetMap(
    "weight scheduler",
    {"linear_decay": schedules.linear_decay, "linear_growth": schedules.linear_growth},
)
"""Weight schedules of progress in [0, 1]."""

TEMPERATURE_SCHEDULER = BuilderMap(
    "temperature scheduler",
    {
        "constant": schedules.constant_temperature,
        "flsw": schedules.flsw,
        "cwsm": schedules.cwsm,
    },
    builders={"flsw": "beta, gamma", "cwsm": "beta"},
)
"""Temperature schedules: ``'constant'``, ``['flsw', beta, gamma]``, ``['cwsm', beta]``."""

MAPS: dict[str, PresetMap] = {
    "kd_loss": KD_LOSS_MAP,
    "match_loss": MATCH_LOSS_MAP,
    "match_Loss": MATCH_LOSS_MAP,  # TextBrewer's spelling
    "projection": PROJ_MAP,
    "weight_scheduler": WEIGHT_SCHEDULER,
    "temperature_scheduler": TEMPERATURE_SCHEDULER,
}


def register_new(map_name: str, name: str, func: Callable[..., Any]) -> None:
    """Add ``func`` under ``name`` to the preset map ``map_name``.

    ``map_name`` is one of ``'kd_loss'``, ``'match_loss'`` (or TextBrewer's ``'match_Loss'``),
    ``'projection'``, ``'weight_scheduler'``, ``'temperature_scheduler'``.

    >>> register_new('match_loss', 'l1', lambda s, t, mask=None: (s - t).abs().mean())
    """
    if map_name not in MAPS:
        raise ValueError(f"unknown map {map_name!r}; valid maps: {sorted(set(MAPS) - {'match_Loss'})}")
    if not isinstance(name, str):
        raise TypeError(f"the name to register must be a str, got {type(name).__name__}")
    if not callable(func):
        raise TypeError(
            f"register_new({map_name!r}, {name!r}, ...) needs a callable, got {type(func).__name__}"
        )
    MAPS[map_name][name] = func


def check_layer_spec(loss: str, layer: Any, field: str) -> None:
    """Raise unless ``layer`` fits ``loss``: a pair of ints for pair losses, else one int."""
    if loss in PAIR_LOSSES:
        ok = isinstance(layer, Sequence) and len(layer) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in layer
        )
        if not ok:
            raise ValueError(
                f"{field}={layer!r}: the {loss!r} loss compares two layers, so {field} must be a "
                f"list of two ints, e.g. {field}=[0, 1]"
            )
    elif not (isinstance(layer, int) and not isinstance(layer, bool)):
        raise ValueError(f"{field}={layer!r}: the {loss!r} loss takes one layer index (an int)")


__all__ = [
    "ADAPTOR_KEYS",
    "CROSS_TOKENIZER_KD_LOSSES",
    "FEATURES",
    "KD_LOSS_MAP",
    "LM_KEYS",
    "MAPS",
    "MATCH_LOSS_MAP",
    "PAIR_LOSSES",
    "PROJ_MAP",
    "SAMPLED_KD_LOSSES",
    "TEMPERATURE_SCHEDULER",
    "TOKEN_KD_LOSSES",
    "TOPK_FORMS",
    "TOPK_KEYS",
    "WEIGHT_SCHEDULER",
    "BuilderMap",
    "KDLossMap",
    "PresetMap",
    "UnknownNameError",
    "check_layer_spec",
    "kd_loss_spec",
    "register_new",
    "registered_divergences",
]
