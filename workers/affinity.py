"""Which worker owns which affinity partition of a model (docs/affinity.md).

Rendezvous (highest random weight) hashing with bounded load: each partition ranks the live
workers by a hash of (worker, partition) and goes to the first one in that order that owns
fewer than `cap` partitions, where `cap` is (1 + load_factor) times the mean, rounded down,
and never below the mean rounded up.  Every worker computes the same answer from the same set
of live workers (the model's heartbeats), without talking to the others; a worker that joins
or leaves moves only about 1/N of the partitions.  Ownership is a preference, never a lock:
every partition is a stream of the model's one consumer group, so two workers that briefly
disagree both read it (each entry still goes to one of them) and a partition nobody owns is
read by the stealing path (workers/reader.py), so no task waits on ownership.

Cost: partitions x workers hashes, once per change of the live set (64 x 8: 0.3 ms).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable


def _weight(worker: str, part: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{worker}/{part}".encode(), digest_size=8).digest(),
                          "big")


def load_cap(partitions: int, workers: int, load_factor: float) -> int:
    """The most partitions one worker may own: the bounded-load limit."""
    mean = partitions / max(1, workers)
    return max(math.ceil(mean), math.floor((1 + load_factor) * mean))


def assign(partitions: int, workers: Iterable[str], load_factor: float) -> dict[str, list[int]]:
    """worker -> the partitions it owns, for every worker given (sorted, deduplicated)."""
    live = sorted(set(workers))
    owned: dict[str, list[int]] = {w: [] for w in live}
    if not live:
        return owned
    cap = load_cap(partitions, len(live), load_factor)
    for part in range(partitions):
        for worker in sorted(live, key=lambda w: _weight(w, part), reverse=True):
            if len(owned[worker]) < cap:
                owned[worker].append(part)
                break
    return owned


class Ownership:
    """One runner's view: the partitions it owns, recomputed when the live set changes."""

    def __init__(self, partitions: int, load_factor: float, me: str):
        self.partitions = partitions
        self.load_factor = load_factor
        self.me = me
        self.live: frozenset[str] = frozenset((me,))
        self.owned: tuple[int, ...] = tuple(range(partitions))  # alone until told otherwise
        self.others: tuple[int, ...] = ()
        self.rebalances = 0  # times the owned set changed

    def update(self, live: Iterable[str]) -> bool:
        """A new set of live workers (this one is always among them); True if what this
        worker owns changed."""
        live = frozenset(live) | {self.me}
        if live == self.live:
            return False
        self.live = live
        owned = tuple(assign(self.partitions, live, self.load_factor)[self.me])
        if owned == self.owned:
            return False
        self.owned = owned
        mine = set(owned)
        self.others = tuple(p for p in range(self.partitions) if p not in mine)
        self.rebalances += 1
        return True
