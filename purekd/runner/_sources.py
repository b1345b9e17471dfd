"""Where micro-batches come from: epochs over a loader, a cycled loader, cached teacher
logits, or tasks sampled in proportion to their size. Each source yields :class:`Micro`."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from purekd.stages import Adapted

from ._rng import rng_state, set_rng_state

Postprocessor = Callable[[Any], Any]


class PassLog:
    """The random state at the start of each pass over a loader, for exact resume.

    A new pass draws from the global generators (a shuffling sampler, worker seeds, the cache
    shuffle), and by then the model has drawn too (dropout). On resume the runner replays the
    data order without running the model, so it restores, before each pass that is still
    running at the checkpoint, the state recorded when that pass began. ``latest`` maps each
    loader key to ``(pass number, state)`` of its current pass; it goes into state files.

    While :attr:`replaying` is set, a pass over a map-style ``DataLoader`` without workers
    draws its sampler's indices but does not fetch or collate the data: it yields
    :data:`SKIPPED` (index-level skipping; the order, the sampler's random draws and hence the
    rest of the run are unchanged). Other loaders are replayed batch by batch.
    """

    def __init__(self, replay: Mapping[str, tuple[int, dict[str, Any]]] | None = None):
        self.count = 0
        self.latest: dict[str, tuple[int, dict[str, Any]]] = {}
        self._replay = dict(replay or {})
        self.replaying = False
        self.skipped = 0  # batches passed over without loading them

    def begin(self, key: str) -> None:
        """Call right before a new pass over the loader ``key`` starts drawing."""
        number = self.count
        self.count += 1
        wanted = self._replay.get(key)
        if wanted is not None and wanted[0] == number:
            set_rng_state(wanted[1])
        self.latest[key] = (number, rng_state())

    def passes(self, loader: Iterable[Any], key: str = "") -> Iterator[Any]:
        """``iter(loader)`` with :meth:`begin` called first."""
        self.begin(key)
        iterator = iter(loader)
        if self.replaying and _skippable(iterator):
            return self._skipping(iterator)
        return iterator

    def _skipping(self, iterator: Any) -> Iterator[Any]:
        while self.replaying:
            try:
                iterator._next_index()  # the sampler's next batch of indices; nothing fetched
            except StopIteration:
                return
            iterator._num_yielded += 1
            self.skipped += 1
            yield SKIPPED
        yield from iterator


SKIPPED = object()
"""What a skipping pass yields in place of a batch while a resumed run replays its data order."""


def _skippable(iterator: Any) -> bool:
    """A single-process iterator over a map-style dataset: its indices can be drawn alone."""
    from torch.utils.data import dataloader

    return (type(iterator) is dataloader._SingleProcessDataLoaderIter
            and iterator._dataset_kind == dataloader._DatasetKind.Map
            and hasattr(iterator, "_next_index") and hasattr(iterator, "_num_yielded"))


class Micro(NamedTuple):
    """One micro-batch and where it sits.

    ``position`` counts micro-batches from the start of the epoch (epoch sources) or of training
    (step and task sources); an optimizer step follows every ``accumulation``-th one.
    ``first_in_epoch`` marks the start of an epoch (gradients are reset there, as in TextBrewer).
    """

    batch: Any
    epoch: int
    position: int
    first_in_epoch: bool = False
    task: str | None = None
    teacher_outputs: Adapted | None = None
    postprocessed: bool = False


def _set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def epochs(loader: Iterable[Any], num_epochs: int, distributed: bool = False,
           log: PassLog | None = None) -> Iterator[Micro]:
    """Every batch of ``loader``, ``num_epochs`` times."""
    log = log or PassLog()
    for epoch in range(num_epochs):
        if distributed:
            _set_epoch(loader, epoch)
        for index, batch in enumerate(log.passes(loader)):
            yield Micro(batch, epoch, index, first_in_epoch=index == 0)


def cached_epochs(cache: list[tuple[Any, Adapted]], num_epochs: int,
                  log: PassLog | None = None) -> Iterator[Micro]:
    """Cached ``(batch, teacher logits)`` pairs, reshuffled (Python's ``random``) every epoch."""
    log = log or PassLog()
    for epoch in range(num_epochs):
        log.begin("")
        random.shuffle(cache)
        for index, (batch, teacher) in enumerate(cache):
            yield Micro(batch, epoch, index, first_in_epoch=index == 0, teacher_outputs=teacher,
                        postprocessed=True)


def cycled(loader: Iterable[Any], log: PassLog | None = None) -> Iterator[Micro]:
    """``loader`` over and over; ``epoch`` counts passes."""
    log = log or PassLog()
    index, epoch = 0, 0
    while True:
        empty = True
        for batch in log.passes(loader):
            empty = False
            yield Micro(batch, epoch, index)
            index += 1
        if empty:
            raise ValueError("the dataloader yielded no batch")
        epoch += 1


def _cycle(loader: Iterable[Any], log: PassLog, key: str) -> Iterator[Any]:
    while True:
        yield from log.passes(loader, key)


def task_sampling_weights(loaders: Mapping[str, Any], tau: float) -> tuple[list[str], list[float] | None]:
    """Tasks and their sampling probabilities ``|d|^tau / sum_d' |d'|^tau`` (uniform, ``None``,
    when some loader has no length), as TextBrewer's MultiTaskDistiller."""
    names = list(loaders)
    if all(hasattr(v, "__len__") for v in loaders.values()):
        sizes = {k: len(v) for k, v in loaders.items()}
        z = sum(pow(v, tau) for v in sizes.values())
        return names, [pow(sizes[k], tau) / z for k in names]
    return names, None


def sampled_tasks(loaders: Mapping[str, Iterable[Any]], tau: float,
                  log: PassLog | None = None) -> Iterator[Micro]:
    """Micro-batches from tasks drawn with NumPy's global generator, in proportion to
    ``size ** tau``; each task's loader is cycled."""
    log = log or PassLog()
    names, weights = task_sampling_weights(loaders, tau)
    iterators = {k: _cycle(v, log, k) for k, v in loaders.items()}
    index = 0
    while True:
        task = str(np.random.choice(names, p=weights))
        yield Micro(next(iterators[task]), 0, index, task=task)
        index += 1


__all__ = ["SKIPPED", "Micro", "PassLog", "cached_epochs", "cycled", "epochs", "sampled_tasks", "task_sampling_weights"]
