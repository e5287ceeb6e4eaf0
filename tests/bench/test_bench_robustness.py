"""bench/bench_robustness.py: more attacks per forgotten model are added to the rows it has, the evaluation of a
model measured already is reused, and the summary spans every row."""
import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_robustness as br  # noqa: E402


def fake_run(monkeypatch):
    """Replaces forgetting and measuring with records of the calls: attack = inversion / 4 + seed / 100."""
    calls = {"train": [], "measure": []}
    monkeypatch.setattr(br, "load_pipeline", lambda model: "base pipeline")
    monkeypatch.setattr(br, "load_classifier", lambda: None)

    def train(name, base, concept, seed, args):
        calls["train"].append((name, seed))
        return f"{name} {seed}", 1.0, br.plain

    def measure(pipe, concept, split, seed, inversion, classifier, args, evaluation=None, drawing_in=br.plain):
        calls["measure"].append((pipe, inversion, evaluation is not None))
        ua = 0.0 if pipe.startswith("base") else 1.0
        evaluation = evaluation or {"ua": ua, "in_domain_retain": 0.9, "cross_domain_retain": 1.0}
        return {"attack": inversion / 4 + seed / 100, "MS": 0.0, "eval": evaluation}
    monkeypatch.setattr(br, "train", train)
    monkeypatch.setattr(br, "measure", measure)
    return calls


def test_more_inversions_add_rows_and_reuse_the_evaluation(tmp_path, monkeypatch):
    calls = fake_run(monkeypatch)
    rows_file = tmp_path / "rows.jsonl"
    args = Namespace(split="held-out", threads=1, concepts=["circle"], methods=["fmn"], inversions=1, model="toy")
    br.run(args, rows_file)
    assert calls["train"] == [("base", 2), ("fmn", 2), ("fmn", 3)]
    assert [m[2] for m in calls["measure"]] == [False, False, False]

    args.inversions = 3
    br.run(args, rows_file)  # two more attacks on each forgotten model, their evaluation taken from the rows
    assert calls["train"][3:] == [("base", 2), ("fmn", 2), ("fmn", 3)]
    assert [(m[1], m[2]) for m in calls["measure"][3:]] == [(1, True), (2, True)] * 3
    rows = br.load_rows(rows_file)
    assert sorted((r["method"], r["seed"], r["inversion"]) for r in rows) == sorted(
        (m, s, j) for m, seeds in (("base", [2]), ("fmn", [2, 3])) for s in seeds for j in range(3))

    br.run(args, rows_file)  # nothing left to do
    assert len(calls["train"]) == 6 and len(br.load_rows(rows_file)) == 9

    fmn = {s["method"]: s for s in br.summarize(rows)}["fmn"]
    assert fmn["attacks"] == 6 and fmn["seeds"] == [2, 3]
    assert abs(fmn["attack"] - (0.25 + 0.025)) < 1e-9  # mean over inversions 0-2 and seeds 2, 3
    assert fmn["attack_min"] == 0.02 and fmn["attack_max"] == 0.53
    assert fmn["IRA_rel"] == 1.0 and not fmn["meets_goals"]  # the attack's mean is above 0.2
