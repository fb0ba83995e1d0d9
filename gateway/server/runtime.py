"""Process-level tuning for a serving process (`tallygate serve`), not for library use:
tests and embedders that call create_app keep the interpreter's defaults."""

from __future__ import annotations

import gc

# Almost everything a request allocates dies by reference counting; the cyclic collector
# still ran a young collection every 700 container allocations (several per request) and
# found next to nothing. Measured with bench/: ~8% of a request's CPU and most of the
# c=16 p99. A larger first threshold keeps the collector for real cycles.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_heap() -> None:
    """Collect once, then move what start-up built (config, price table, SDKs, tokenizers)
    to the permanent generation: full collections then walk only what requests made."""
    gc.collect()
    gc.freeze()
