"""Small helpers shared by the API and the ops (below both: no import of either)."""
import os


def triton_interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
