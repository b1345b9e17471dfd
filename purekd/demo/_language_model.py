"""The language-model demo's models — moved to :mod:`purekd.recipes._models` (the recipe runs
load, compress and score models the same way); re-exported here for the demo's names."""

from purekd.recipes._models import (
    BUNDLED_PACKAGE,
    GGUF_MAGIC,
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

__all__ = ["BUNDLED_PACKAGE", "GGUF_MAGIC", "Perplexity", "bundled_teacher",
           "check_same_vocabulary", "compress", "decoder_layers", "load_teacher",
           "parameter_count", "perplexity", "spread_layers", "vocabulary_size"]
