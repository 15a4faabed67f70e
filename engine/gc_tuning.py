"""Garbage collection for a long-running server process.

Start-up leaves hundreds of thousands of long-lived container objects behind (imported
modules, the tokenizer, the model's Python objects). CPython's full collections walk all of
them, and a serving loop that allocates per token triggers one every few seconds, each a
stall of every stream (and of the GPU, which waits for the next plan; docs/benchmarks.md,
"CPU, served: the server's own work with 256 streams"). `freeze_startup_objects()` moves what start-up allocated to the permanent
generation, where collections never look, once start-up is done (in processes the server
owns: its own and the workers', never in a user's process that runs `LLM`), and makes the youngest
generation 10x larger than CPython's 700 objects (the per-token objects of a step are mostly
gone before they would be examined), so all collections run less often.
"""

from __future__ import annotations

import gc

_GEN0_THRESHOLD = 7_000


def freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(_GEN0_THRESHOLD, gc.get_threshold()[0]), gen1, gen2)


def unfreeze() -> None:
    """Before the process exits: interpreter shutdown then finalizes the frozen objects as
    usual (extension modules report objects still alive at exit as leaks)."""
    gc.unfreeze()
