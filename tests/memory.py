"""Measuring the memory a structure really holds, with ``tracemalloc``."""

import gc
import tracemalloc
from typing import Callable, TypeVar

T = TypeVar("T")


def traced_bytes(build: Callable[[], T]) -> tuple[T, int]:
    """Run ``build`` and return what it built with the bytes still allocated after it.

    Whatever ``build`` allocated and let go of is collected first, so the figure is what
    its result (and anything it left alive) holds.
    """
    gc.collect()
    tracemalloc.start()
    try:
        built = build()
        gc.collect()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return built, current
