"""`fmn` for the multi-process tests (tests/forgetting/test_distributed.py), run by torchrun or accelerate launch,
with test-only hooks set by environment variables (fmn itself has none):

FMN_TEST_LOG=DIR           each process appends the files it writes (fmn.cli.outputs.commit, Patch.save,
                           fmn.patches.patch.atomic_write) and the grids it draws to DIR/rank<RANK>.log
FMN_TEST_FAIL_RANK=R       process R raises RuntimeError at its FMN_TEST_FAIL_STEP-th (default 2) training step,
                           while the other is in the step's collective
FMN_TEST_FAIL_CONCEPT=C    fmn.forgetting.trainer.forget raises RuntimeError when asked to forget C
"""
import os
import sys
from pathlib import Path

RANK = os.environ.get("RANK", "0")


def log(line):
    folder = os.environ.get("FMN_TEST_LOG")
    if folder:
        with open(Path(folder) / f"rank{RANK}.log", "a") as f:
            f.write(line + "\n")


def wrap(owner, name, before):
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        before(*args, **kwargs)
        return real(*args, **kwargs)

    setattr(owner, name, wrapped)


def install():
    import fmn.cli.commands
    import fmn.cli.outputs
    import fmn.forgetting.losses
    import fmn.forgetting.trainer
    import fmn.patches.patch
    wrap(fmn.cli.outputs, "commit", lambda outputs, **_: [log(f"write {path}") for path, _, _ in outputs])
    wrap(fmn.patches.patch, "atomic_write", lambda path, *a, **k: log(f"write {path}"))
    wrap(fmn.cli.commands, "_compare_grid", lambda *a, **k: log("grid"))
    if os.environ.get("FMN_TEST_FAIL_RANK") == RANK:
        steps, at = [0], int(os.environ.get("FMN_TEST_FAIL_STEP", "2"))

        def count(run, batch, backward=False, **kwargs):
            steps[0] += bool(backward)
            if steps[0] == at:
                raise RuntimeError(f"injected failure in process {RANK}")
        wrap(fmn.forgetting.losses, "forgetting_step", count)
    concept = os.environ.get("FMN_TEST_FAIL_CONCEPT")
    if concept:
        def refuse(pipe, concepts, *args, **kwargs):
            if concept in concepts:
                raise RuntimeError(f"injected failure for {concept}")
        wrap(fmn.forgetting.trainer, "forget", refuse)


if __name__ == "__main__":
    install()
    from fmn.cli.commands import main
    sys.exit(main())
