"""Test setup: without CUDA, Triton kernels run under the interpreter on the CPU.

TRITON_INTERPRET must be set before triton is first imported, hence here, at collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models on 2 cores: one thread avoids oversubscription, which slows them ~100x when the
# interpreter, torch and other test workers compete for the cores.
torch.set_num_threads(1)
