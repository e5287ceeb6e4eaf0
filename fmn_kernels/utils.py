"""Small helpers shared by fmn_kernels' modules (kept apart from api.py to avoid import cycles)."""
import os


def triton_interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
