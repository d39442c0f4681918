"""How a lease is shared: pure decisions, no database (the store applies them).

Within a priority class every job with leasable items gets an even share of the lease
(:func:`fair_shares`), so a small job is never starved behind a large one; a token budget is then
spent round-robin over those jobs (:func:`fit_token_budget`), so it is shared the same way.
"""

from __future__ import annotations

from collections.abc import Sequence


def fair_shares(ready: Sequence[int], room: int) -> list[int]:
    """Split ``room`` leases between jobs that have ``ready[i]`` items each, as evenly as
    their counts allow (water-filling): a job with few items gets all of them, the rest is
    shared by the others. When ``room`` does not divide evenly the first jobs get one more;
    the caller rotates the order call by call so that no job is always first."""
    shares = [0] * len(ready)
    active = [i for i, n in enumerate(ready) if n > 0]
    while room > 0 and active:
        each = max(1, room // len(active))
        for i in list(active):
            take = min(each, ready[i] - shares[i], room)
            shares[i] += take
            room -= take
            if shares[i] == ready[i]:
                active.remove(i)
            if room == 0:
                break
    return shares


def fit_token_budget(
    sizes: Sequence[Sequence[int]], classes: Sequence[int], max_tokens: int
) -> list[int]:
    """How many of each candidate list to keep under ``max_tokens``.

    ``sizes[i]`` are the token counts of entry ``i``'s candidates in lease order, ``classes[i]``
    its priority class; entries come highest class first. Within a class items are taken
    round-robin over the entries; the first item that does not fit ends the lease. The very
    first item is taken whatever its size: a batch of one over the budget is still work.
    """
    taken = [0] * len(sizes)
    budget, first = max_tokens, True
    for priority in dict.fromkeys(classes):
        group = [i for i, c in enumerate(classes) if c == priority]
        while group:
            for i in list(group):
                if taken[i] >= len(sizes[i]):
                    group.remove(i)
                    continue
                size = sizes[i][taken[i]]
                if size > budget and not first:
                    return taken
                taken[i] += 1
                budget -= size
                first = False
    return taken
