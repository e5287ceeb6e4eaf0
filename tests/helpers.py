"""Small helpers shared by the test files (the kernel tests' inputs and tolerance rule: attention_checks.py)."""

# The CLI's fastest forget run on a tiny pipeline: 2 steps, 1 generation step, 2 reference images.
FAST_CLI = ["--steps", "2", "--lr", "1e-3", "--gen-steps", "1", "--n-images", "2", "--backend", "reference", "-q"]


def interrupt_on_call(monkeypatch, owner, name, n):
    """Patches owner.name so that its n-th call raises KeyboardInterrupt (the others run it);
    returns the dict whose "n" counts the calls."""
    real, calls = getattr(owner, name), {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return calls
