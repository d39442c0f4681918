import gc

from inference.heap import freeze_startup_heap


def test_the_startup_heap_leaves_the_collectors_sight_and_new_garbage_is_still_collected() -> None:
    try:
        before = gc.get_count()
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 1000  # this process's modules, at least
        assert sum(gc.get_count()) <= sum(before)  # nothing young left behind
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # objects made after the freeze are collected as before
    finally:
        gc.unfreeze()
