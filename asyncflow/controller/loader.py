"""The prompt loader: which dataset indices each step admits, seeded and resumable.

Indices are drawn from a per-epoch permutation (seeded by run seed and epoch), so the sequence is
a pure function of (seed, position): a resumed run continues at the saved ``position`` and draws
exactly the prompts an uninterrupted run would have drawn.
"""

from __future__ import annotations

import random


class PromptLoader:
    def __init__(self, size: int, seed: int, shuffle: bool = True, position: int = 0) -> None:
        if size < 1:
            raise ValueError("the training dataset is empty")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self._epoch = -1
        self._perm: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            perm = list(range(self.size))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._epoch, self._perm = epoch, perm
        return self._perm

    def take(self, n: int) -> list[int]:
        """The next ``n`` dataset indices."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.position, self.size)
            out.append(self._order(epoch)[i])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"position": self.position}
