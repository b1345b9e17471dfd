"""The intermediate-match terms: a loss between layers of a feature, or between the outputs
of arbitrary submodules (custom matches)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from purekd import losses
from purekd.stages import Adapted

from ._context import Context, Term, Weight

Layer = int | Sequence[int]
MatchLoss = Callable[..., Tensor]

WIDTH_FREE_LOSSES = frozenset({"mmd", "nst"})
"""Match losses that compare position-by-position Gram matrices, so widths may differ."""


def known_match_loss(loss: Any) -> str | None:
    """The preset name of one of purekd's match losses (``'hidden_mse'``, ...), recognised by the
    function object, or ``None`` for any other function."""
    for name, function in losses.MATCH_LOSSES.items():
        if function is loss:
            return name
    return None


def _fmt(layer: Layer) -> str:
    return "-".join(map(str, layer)) if isinstance(layer, Sequence) else str(layer)


def match_name(feature: str, loss_name: str, layer_S: Layer, layer_T: Layer) -> str:
    """TextBrewer's name for a match: ``'{feature}_{loss}_{S}_{T}'``, pairs joined by ``-``."""
    return f"{feature}_{loss_name}_{_fmt(layer_S)}_{_fmt(layer_T)}"


def select_layers(adapted: Adapted, feature: str, layer: Layer) -> Any:
    """``adapted.<feature>[layer]``, or a list of the two layers for a pair."""
    features = getattr(adapted, feature)
    if isinstance(layer, Sequence):
        return [features[i] for i in layer]
    return features[layer]


_EMPTY_HINT = {
    "attention": (
        ". If it does and the list is empty, the model computed no attention weights: "
        "Hugging Face models with the default 'sdpa' (or flash) attention return an empty "
        "'attentions' tuple even with output_attentions=True; load the model with "
        "attn_implementation=\"eager\" (or call model.set_attn_implementation(\"eager\")) and "
        "pass output_attentions=True"),
    "hidden": (
        ". If it does and the list is empty, the model returned no hidden states: Hugging "
        "Face models return them only with output_hidden_states=True"),
}


def _check_indices(label: str, side: str, adapted: Adapted, feature: str, layer: Layer) -> None:
    available = len(getattr(adapted, feature))
    for index in layer if isinstance(layer, Sequence) else [layer]:
        if not -available <= index < available:
            raise ValueError(
                f"{label}: layer_{side}={index} but the {'student' if side == 'S' else 'teacher'}'s "
                f"adaptor returned {available} {feature!r} layer(s)"
                + (f" (valid indices 0..{available - 1})" if available else
                   f": return {feature!r} from the adaptor" + _EMPTY_HINT.get(feature, ""))
            )


def _check_projection(label: str, projection: nn.Module, width_S: int, width_T: int,
                      match_teacher: bool) -> None:
    """The projection's first linear layer must take the student's width (and, unless the loss
    allows different widths, produce the teacher's)."""
    linear = next((m for m in projection.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        return
    fix = f"set 'proj': [kind, {width_S}, {width_T}]"
    if linear.in_features != width_S:
        raise ValueError(
            f"{label}: the projection maps width {linear.in_features} to {linear.out_features}, "
            f"but the student's feature has width {width_S}; {fix}")
    if match_teacher and linear.out_features != width_T:
        raise ValueError(
            f"{label}: the projection maps width {linear.in_features} to {linear.out_features}, "
            f"but the teacher's feature has width {width_T}; {fix}")


def intermediate_match(
    feature: str,
    layer_S: Layer,
    layer_T: Layer,
    loss: MatchLoss,
    projection: nn.Module | None = None,
    weight: Weight = 1.0,
    name: str | None = None,
    loss_name: str | None = None,
) -> Term:
    """A term ``{name: loss(proj(feature_S[layer_S]), feature_T[layer_T], mask=inputs_mask_S)}``.

    ``feature`` is ``'hidden'`` or ``'attention'``; a layer is an index into the adaptor's list,
    or a pair of indices for the pair losses (``fsp``, ``mmd``), in which case ``proj`` applies to
    both student layers. ``loss_name`` (default: ``loss.__name__``) names the loss in messages and
    in the default ``name`` (:func:`match_name`).

    Its check: both layer indices exist, and, for one of purekd's match losses other than
    ``mmd``/``nst`` (recognised by the function itself, or by ``loss_name``) with no projection,
    the student and teacher features have the same width; a projection must take the student's
    width. A projection that is an ``nn.Module`` is the term's trainable module
    (``term.modules``), so a :class:`~purekd.Step` trains it.
    """
    known = known_match_loss(loss)
    loss_label: str = loss_name or known or str(getattr(loss, "__name__", "loss"))
    # purekd's match losses compare entry by entry unless they are width-free; a user's loss
    # function may compare features of different widths, so it is checked only when named.
    compares_widths = ((known is not None or loss_name is not None)
                       and loss_label not in WIDTH_FREE_LOSSES
                       and (known or loss_label) not in WIDTH_FREE_LOSSES)
    term_name = name or match_name(feature, loss_label, layer_S, layer_T)
    label = (f"intermediate match {term_name!r} (feature {feature!r}, loss {loss_label!r}, "
             f"layer_S={layer_S!r}, layer_T={layer_T!r})")

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        inter_S = select_layers(adapted_S, feature, layer_S)
        inter_T = select_layers(adapted_T, feature, layer_T)
        if projection is not None:
            inter_S = ([projection(s) for s in inter_S] if isinstance(inter_S, list)
                       else projection(inter_S))
        return {term_name: loss(inter_S, inter_T, mask=adapted_S.inputs_mask)}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        _check_indices(label, "S", adapted_S, feature, layer_S)
        _check_indices(label, "T", adapted_T, feature, layer_T)
        first_S = select_layers(adapted_S, feature, layer_S)
        first_T = select_layers(adapted_T, feature, layer_T)
        if isinstance(first_S, list):
            first_S, first_T = first_S[0], first_T[0]
        width_S, width_T = first_S.shape[-1], first_T.shape[-1]
        if projection is not None:
            _check_projection(label, projection, width_S, width_T,
                              loss_label not in WIDTH_FREE_LOSSES)
            return
        if not compares_widths:
            return
        if width_S != width_T:
            raise ValueError(
                f"{label}: the student's feature has width {width_S} (shape "
                f"{tuple(first_S.shape)}) but the teacher's has width {width_T} (shape "
                f"{tuple(first_T.shape)}); add a projection to the match: "
                f"'proj': ['linear', {width_S}, {width_T}]"
            )

    modules = (projection,) if isinstance(projection, nn.Module) else ()
    return Term(term, weight, check, term_name, modules)


def custom_match(
    index: int,
    loss: Callable[..., Tensor],
    projection: Callable[[Any], Any] | None = None,
    weight: Weight = 1.0,
    name: str | None = None,
) -> Term:
    """A term on the outputs captured from arbitrary submodules (TextBrewer's custom matches).

    ``{name: loss(proj(captured_S[index]), captured_T[index], inputs_mask_S, inputs_mask_T)}``,
    the four-argument signature TextBrewer gives custom-match losses.
    """
    term_name = name or f"custom_match_{index}"

    def term(adapted_S: Adapted, adapted_T: Adapted, ctx: Context) -> dict[str, Tensor]:
        del ctx
        out_S, out_T = adapted_S.captured[index], adapted_T.captured[index]
        if projection is not None:
            out_S = projection(out_S)
        return {term_name: loss(out_S, out_T, adapted_S.inputs_mask, adapted_T.inputs_mask)}

    def check(adapted_S: Adapted, adapted_T: Adapted) -> None:
        for side, adapted in (("student", adapted_S), ("teacher", adapted_T)):
            if index >= len(adapted.captured) or adapted.captured[index] is None:
                raise ValueError(
                    f"custom match #{index} ({term_name!r}): the {side}'s module was not called "
                    "during the forward pass, so it has no output to match"
                )

    modules = (projection,) if isinstance(projection, nn.Module) else ()
    return Term(term, weight, check, term_name, modules)


__all__ = ["WIDTH_FREE_LOSSES", "custom_match", "intermediate_match", "match_name",
           "select_layers"]
