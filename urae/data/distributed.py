"""The little of accelerate the caches need: this rank, the rank count, and a barrier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Ranks:
    index: int = 0
    count: int = 1
    _state: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def can_sync(self) -> bool:
        return self._state is not None or self.count == 1

    @property
    def synchronised(self) -> bool:
        """Whether barrier() really waits for the others (an (index, count) pair does not)."""
        return self.count == 1 or self._state is not None

    def barrier(self) -> None:
        if self._state is not None and self.count > 1:
            self._state.wait_for_everyone()

    def share(self, items: list) -> list:
        """This rank's slice of `items` (round robin, so neighbouring buckets spread over ranks)."""
        return items[self.index::self.count]


def ranks_of(accelerator=None) -> Ranks:
    """From an `accelerate.Accelerator`/`PartialState`, a (process_index, num_processes) pair, or None."""
    if accelerator is None:
        return Ranks()
    if isinstance(accelerator, tuple):
        # No barrier: the caller synchronises, and only then is rank 0's cache complete.
        index, count = accelerator
        return Ranks(int(index), int(count))
    return Ranks(accelerator.process_index, accelerator.num_processes, accelerator)
