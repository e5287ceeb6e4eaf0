"""Tile sizes of the concept-attention kernels per (kernel, precision, padded head dim, GPU class).

Entries are checked by compiling them ahead of time for sm_80, sm_86 and sm_90 with Triton's
compiler and ptxas (`python -m fmn_kernels.aot`; measured shared memory, registers and spills per
variant in bench/results/aot_sm*.json, which say which cases were covered): the aim is that every
variant fits the class's shared memory with 0 spill bytes. Entries changed after a spill or an
overflow was measured carry a comment. `tiles()` returns the table's choice followed by smaller
ones; the host launches the first that loads within the GPU's limits (`cross_attention._launch`),
so a GPU or Triton version the table did not foresee gets a smaller tile, never OutOfResources.

Measured winners: `python -m fmn_kernels.tune` times candidate tiles on the present GPU and writes
bench/results/tune_<gpu>.json; at import the winners of every such file (not dry runs) replace the
table's choice for their GPU class (`TUNED`). FMN_TUNE_FILES=none ignores them; a path list (os.pathsep)
reads those files instead. The ahead-of-time gate (fmn_kernels.aot) accepts the table's tile or the
tuned one; the tune run itself only keeps tiles that compiled there with 0 spills within shared memory.

Precision classes: "16bit" (fp16/bf16 tensor-core dots), "tf32" (fp32 inputs, TF32 dots, taken when
torch.backends.cuda.matmul.allow_tf32 is set), "ieee" (fp32 inputs, exact fp32 FMA dots: no tensor
cores, so smaller tiles).
GPU classes by shared memory per block: "sm90" (227 KB: H100/H200, also used for sm_100), "sm80"
(163 KB: A100, Orin), "sm86" (99 KB: RTX 30xx/40xx, L4, L40, and anything unknown).
"""
import json
import os
from pathlib import Path
from typing import NamedTuple

SMEM_LIMIT = {"sm90": 232448, "sm80": 166912, "sm86": 101376}
ARCH_CLASSES = tuple(SMEM_LIMIT)


class Tile(NamedTuple):
    block_m: int     # query rows per block
    block_n: int     # keys per block (0: all keys in one block, the next power of two >= L)
    num_warps: int
    num_stages: int


def arch_class(capability: int) -> str:
    """capability: major * 10 + minor, e.g. 90 for sm_90."""
    if capability in (80, 87):
        return "sm80"
    if capability >= 90 and capability not in (120, 121):
        return "sm90"
    return "sm86"


# Kernels: "fwd1" forward with all keys in one block (L <= 128); "fwd" forward looping over keys;
# "fwd_long" the same for long keys and queries (MM-DiT); "bwd1" the fused backward (one key block:
# delta, dQ, dK, dV in one pass); "dkdv" dK/dV of block_n keys (the M dimension of its dots) looping
# over block_m query rows at a time, "dkdv_long" the same for long sequences; "dq" dQ of block_m query
# rows looping over block_n keys, "dq_long" the same for long sequences.
# Key: (kernel, precision class, BLOCK_D) -> {GPU class or "all": Tile}. None: not used (the host
# takes the looping kernel instead).
_T = Tile
TABLE = {
    # ---- fp16 / bf16 ----
    # sm80 (64, 0, 4, 1): 32 B spill, (64, 0, 8, 1): 64 B (fp16, all masks)
    ("fwd1", "16bit", 64): {"all": _T(64, 0, 4, 1), "sm80": _T(32, 0, 4, 1)},
    ("fwd1", "16bit", 128): {"all": _T(32, 0, 4, 1)},  # sm90 (64, 0, 8, 1): 92 B spill (fp16, D=80, all masks)
    ("fwd1", "16bit", 256): {"all": None},
    ("fwd", "16bit", 64): {"all": _T(64, 64, 4, 2)},
    ("fwd", "16bit", 128): {"all": _T(64, 64, 8, 2), "sm86": _T(64, 32, 8, 2)},
    ("fwd", "16bit", 256): {"all": _T(64, 32, 8, 2), "sm86": _T(32, 32, 4, 1)},
    ("fwd_long", "16bit", 64): {"all": _T(128, 64, 8, 3)},
    ("fwd_long", "16bit", 128): {"all": _T(128, 64, 8, 3), "sm86": _T(128, 32, 8, 1)},
    ("fwd_long", "16bit", 256): {"all": _T(64, 32, 8, 2), "sm86": _T(32, 32, 4, 1)},
    ("bwd1", "16bit", 64): {"all": _T(32, 0, 8, 1)},
    ("bwd1", "16bit", 128): {"all": None},
    ("bwd1", "16bit", 256): {"all": None},
    # sm80 (32, 64, 4, 2): 255 registers, 32 B spill (sm86: 254 registers); 8 warps: 255, 48 B spill
    ("dkdv", "16bit", 64): {"all": _T(32, 64, 4, 2), "sm80": _T(32, 32, 4, 1), "sm86": _T(32, 32, 4, 1)},
    ("dkdv", "16bit", 128): {"all": _T(32, 64, 8, 2), "sm86": _T(32, 32, 8, 1)},
    ("dkdv", "16bit", 256): {"all": _T(32, 32, 8, 1), "sm86": _T(16, 32, 8, 1)},
    ("dkdv_long", "16bit", 64): {"all": _T(64, 128, 8, 2), "sm86": _T(32, 64, 4, 2)},
    # sm80 (32, 128, 8, 2): 16 B spill; (32, 128, 8, 1): 5.7 KB
    ("dkdv_long", "16bit", 128): {"all": _T(32, 128, 8, 2), "sm80": _T(16, 128, 8, 2), "sm86": _T(32, 32, 8, 1)},
    ("dkdv_long", "16bit", 256): {"all": _T(32, 32, 8, 1), "sm86": _T(16, 32, 8, 1)},
    ("dq", "16bit", 64): {"all": _T(64, 64, 4, 2)},
    # sm86 (64, 32, 8, 1): 8 B spill; sm80 (64, 64, 8, 2) with the concept weights alone: 4 B spill
    ("dq", "16bit", 128): {"all": _T(64, 64, 8, 2), "sm80": _T(64, 64, 8, 1), "sm86": _T(32, 32, 8, 1)},
    # sm80 (32, 32, 8, 1) without masks: 8 B spill
    # sm80/sm86 (32, 16, 8, 1): 8 B spill, (16, 16, 8, 1): 12 B
    ("dq", "16bit", 256): {"all": _T(32, 32, 8, 1), "sm80": _T(16, 16, 4, 1), "sm86": _T(16, 16, 4, 1)},
    ("dq_long", "16bit", 64): {"all": _T(128, 64, 8, 2), "sm86": _T(64, 64, 4, 2)},
    # sm80 (128, 32, 8, 2) with the lean loops and all masks: 255 registers, 104 B spill; (64, 32, 8, 2): 168
    ("dq_long", "16bit", 128): {"all": _T(128, 32, 8, 2), "sm80": _T(64, 32, 8, 2), "sm86": _T(32, 32, 8, 1)},
    ("dq_long", "16bit", 256): {"all": _T(32, 32, 8, 1), "sm80": _T(16, 16, 4, 1), "sm86": _T(16, 16, 4, 1)},
    # ---- fp32, TF32 dots ----
    # sm80: (64, 0, 4, 1) spilled 476 B at 255 registers; (32, 0, 4, 1): 182 registers, no spill
    # sm80: (32, 0, 4, 1) without masks 8 B spill at 168 registers, (16, 0, 4, 1) 4 B with the weights alone,
    # (32, 0, 8, 1) 8 B: the looping kernel's (64, 64, 4, 2) does not spill
    # sm90 (64, 0, 4, 1): 64 B spill, (64, 0, 8, 1): 40 B
    ("fwd1", "tf32", 64): {"all": _T(32, 0, 4, 1), "sm80": None},
    ("fwd1", "tf32", 128): {"all": _T(32, 0, 8, 1), "sm80": None, "sm86": None},
    ("fwd1", "tf32", 256): {"all": None},
    ("fwd", "tf32", 64): {"all": _T(64, 64, 4, 2), "sm86": _T(32, 32, 4, 1)},  # sm86 (64, 32, 4, 1): 16 B spill
    ("fwd", "tf32", 128): {"all": _T(64, 32, 8, 2), "sm80": _T(64, 32, 8, 1), "sm86": _T(32, 32, 4, 1)},  # sm80: 8 B
    ("fwd", "tf32", 256): {"all": _T(32, 32, 8, 1), "sm86": _T(16, 32, 8, 1)},
    ("fwd_long", "tf32", 64): {"all": _T(64, 64, 4, 2), "sm86": _T(32, 32, 4, 1)},  # sm86 (64, 32, 4, 1): 16 B
    ("fwd_long", "tf32", 128): {"all": _T(64, 32, 8, 2), "sm86": _T(32, 32, 4, 1)},
    ("fwd_long", "tf32", 256): {"all": _T(32, 32, 8, 1), "sm86": _T(16, 32, 8, 1)},
    ("bwd1", "tf32", 64): {"all": _T(16, 0, 8, 1), "sm86": None},
    ("bwd1", "tf32", 128): {"all": None},
    ("bwd1", "tf32", 256): {"all": None},
    ("dkdv", "tf32", 64): {"all": _T(32, 32, 4, 1)},
    # 8 warps got 128 registers and spilled 8 B on sm90 with (32, 32, 8, 1) at D=80 and (16, 32, 8, 1) at D=128
    # sm90 (16, 16, 4, 1) for the attention loss alone (no dO): 8 B spill
    ("dkdv", "tf32", 128): {"all": _T(16, 16, 4, 1), "sm90": _T(16, 32, 4, 1)},
    ("dkdv", "tf32", 256): {"all": _T(16, 32, 8, 1), "sm86": _T(16, 16, 8, 1)},
    ("dkdv_long", "tf32", 64): {"all": _T(32, 32, 4, 1)},
    ("dkdv_long", "tf32", 128): {"all": _T(16, 16, 4, 1), "sm90": _T(16, 32, 4, 1)},
    ("dkdv_long", "tf32", 256): {"all": _T(16, 32, 8, 1), "sm86": _T(16, 16, 8, 1)},
    ("dq", "tf32", 64): {"all": _T(32, 64, 4, 1)},
    ("dq", "tf32", 128): {"all": _T(32, 32, 8, 1), "sm80": _T(16, 32, 8, 1)},  # sm80: 8 B spill
    ("dq", "tf32", 256): {"all": _T(16, 32, 8, 1), "sm86": _T(16, 16, 8, 1)},
    ("dq_long", "tf32", 64): {"all": _T(32, 64, 4, 1)},
    ("dq_long", "tf32", 128): {"all": _T(32, 32, 8, 1), "sm80": _T(16, 32, 8, 1)},
    ("dq_long", "tf32", 256): {"all": _T(16, 32, 8, 1), "sm86": _T(16, 16, 8, 1)},
    # ---- fp32, exact (IEEE) dots: FMA, register-bound ----
    ("fwd1", "ieee", 64): {"all": None},
    ("fwd1", "ieee", 128): {"all": None},
    ("fwd1", "ieee", 256): {"all": None},
    ("fwd", "ieee", 64): {"all": _T(32, 32, 4, 1)},
    ("fwd", "ieee", 128): {"all": _T(16, 32, 8, 1)},  # (32, 32, 8, 1) spilled 40 B on sm90
    ("fwd", "ieee", 256): {"all": _T(16, 32, 8, 1)},
    ("fwd_long", "ieee", 64): {"all": _T(32, 32, 4, 1)},
    ("fwd_long", "ieee", 128): {"all": _T(16, 32, 8, 1)},
    ("fwd_long", "ieee", 256): {"all": _T(16, 32, 8, 1)},
    ("bwd1", "ieee", 64): {"all": None},
    ("bwd1", "ieee", 128): {"all": None},
    ("bwd1", "ieee", 256): {"all": None},
    ("dkdv", "ieee", 64): {"all": _T(16, 32, 4, 1)},
    # sm86 D=80 (16, 32, 8, 1): 4 B spill; sm80 with the attention loss alone: 4 B spill
    ("dkdv", "ieee", 128): {"all": _T(16, 32, 8, 1), "sm80": _T(16, 16, 8, 1), "sm86": _T(16, 16, 8, 1)},
    # sm86 (16, 16, 8, 1) with the concept weights alone: 40 B spill; larger tiles exceed 99 KB
    ("dkdv", "ieee", 256): {"all": _T(16, 16, 8, 1), "sm86": _T(16, 16, 4, 1)},
    ("dkdv_long", "ieee", 64): {"all": _T(16, 32, 4, 1)},
    ("dkdv_long", "ieee", 128): {"all": _T(16, 32, 8, 1), "sm80": _T(16, 16, 8, 1), "sm86": _T(16, 16, 8, 1)},
    ("dkdv_long", "ieee", 256): {"all": _T(16, 16, 8, 1), "sm86": _T(16, 16, 4, 1)},
    ("dq", "ieee", 64): {"all": _T(32, 32, 4, 1), "sm80": _T(16, 32, 4, 1)},  # sm80: 4 B spill (weights alone)
    ("dq", "ieee", 128): {"all": _T(16, 32, 8, 1)},
    ("dq", "ieee", 256): {"all": _T(16, 16, 8, 1)},
    ("dq_long", "ieee", 64): {"all": _T(32, 32, 4, 1), "sm80": _T(16, 32, 4, 1)},
    ("dq_long", "ieee", 128): {"all": _T(16, 32, 8, 1), "sm80": _T(16, 16, 8, 1)},  # sm80: 8 B spill
    ("dq_long", "ieee", 256): {"all": _T(16, 16, 8, 1)},
}
KERNELS = ("fwd1", "fwd", "fwd_long", "bwd1", "dkdv", "dkdv_long", "dq", "dq_long")
PRECISIONS = ("16bit", "tf32", "ieee")


TUNED = {}  # (kernel, precision, BLOCK_D, GPU class) -> Tile measured fastest (tune_*.json)
RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def table_tile(kernel: str, precision: str, block_d: int, arch: str, tuned: bool = True):
    """The tile for this key (a measured winner first unless tuned=False), or None where the kernel
    is not used for it. block_d < 64 uses 64's."""
    block_d = max(64, block_d)
    if tuned and (kernel, precision, block_d, arch) in TUNED:
        return TUNED[(kernel, precision, block_d, arch)]
    entry = TABLE[(kernel, precision, block_d)]
    return entry.get(arch, entry["all"])


def tune_files():
    """The tune results read at import: FMN_TUNE_FILES (paths, or "none"), else bench/results/tune_*.json."""
    setting = os.environ.get("FMN_TUNE_FILES")
    if setting is not None:
        return [] if setting.strip().lower() in ("", "none") else [Path(p) for p in setting.split(os.pathsep)]
    return sorted(RESULTS.glob("tune_*.json"))


def load_tuned(paths):
    """Measured winners of these tune files (later files override earlier), as TUNED's items; dry
    runs (the interpreter's timings) and unreadable files are skipped."""
    tuned = {}
    for path in paths:
        try:
            payload = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if payload.get("dry_run"):
            continue
        for row in payload.get("winners", []):
            key = (row["kernel"], row["precision"], max(64, int(row["block_d"])), row["arch"])
            if key[:3] in TABLE:  # a kernel this version still has
                tuned[key] = Tile(*row["tile"])
    return tuned


def smaller_tiles(tile: Tile, min_block_n: int = 16):
    """Fallbacks after `tile`, each needing less shared memory and fewer registers than the last."""
    out = []
    m, n, warps, stages = tile
    while stages > 1:
        stages -= 1
        out.append(Tile(m, n, warps, stages))
    while m > 16:
        m //= 2
        out.append(Tile(m, n, warps, stages))
    while n > min_block_n:
        n //= 2
        out.append(Tile(m, n, warps, stages))
    return out


def tiles(kernel: str, precision: str, block_d: int, arch: str):
    """[table choice, fallbacks...]; [] where the table does not use this kernel."""
    tile = table_tile(kernel, precision, block_d, arch)
    return [] if tile is None else [tile] + smaller_tiles(tile)


TUNED.update(load_tuned(tune_files()))
