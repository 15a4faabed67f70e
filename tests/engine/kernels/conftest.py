"""Kernel tests run on a GPU when there is one, else under the Triton CPU interpreter.

The interpreter is chosen by TRITON_INTERPRET, which must be set before the kernel modules
apply `triton.jit`; conftest files are imported before the test modules they serve.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
