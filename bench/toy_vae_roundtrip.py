#!/usr/bin/env python
"""Does the toy VAE keep the five shapes apart at 32 px? The shipped classifier on fresh images and on
their VAE round trips (decode of the latent mean), per shape. Answers whether toy-mmdit's circle /
square confusion comes from the data and VAE (round trip < 1) or from the transformer.

    .venv/bin/python bench/toy_vae_roundtrip.py            # writes bench/results/toy_vae_roundtrip.json
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, write_json_atomic  # noqa: E402

from fmn.toy import classifier, data  # noqa: E402
from fmn.toy import mmdit_model as MM  # noqa: E402


def shape_accuracy(clf, images, shapes):
    pred = clf.classify(images)["shape"]
    per_shape = {data.SHAPES[k]: float((pred[shapes == k] == k).float().mean()) for k in range(len(data.SHAPES))}
    return {"shape_acc": float((pred == shapes).float().mean()), "per_shape": per_shape}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=str(Path(__file__).resolve().parents[1] / "fmn/assets/toy/mmdit"),
                    help="pipeline folder whose vae/ is checked (default: the shipped toy-mmdit)")
    ap.add_argument("--n", type=int, default=250, help="images, balanced over shapes and colours")
    ap.add_argument("--seed", type=int, default=50, help="data seed (not a training pool seed)")
    ap.add_argument("--out", default=str(RESULTS / "toy_vae_roundtrip.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    vae = MM.load_unet_toy_vae(args.pipeline)
    clf = classifier.load_classifier()
    samples = [data.make_sample(args.seed, i, shape=i % 5, color=(i // 5) % 5) for i in range(args.n)]
    x = classifier.to_model_input(np.stack([s.image for s in samples]))
    shapes = torch.tensor([s.shape for s in samples])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    result = {"originals": shape_accuracy(clf, x, shapes), "vae_round_trip": shape_accuracy(clf, rec, shapes),
              "n": args.n, "seed": args.seed, "machine": machine_info()}
    for key in ("originals", "vae_round_trip"):
        print(f"{key}: shape {result[key]['shape_acc']:.3f} {result[key]['per_shape']}")
    write_json_atomic(Path(args.out), result)


if __name__ == "__main__":
    main()
