"""Sanity check of a Med-MAT-mini world: does Related data beat Unrelated data on an unseen target?

Trains a small CNN that scores each option's label name against the image (a stand-in for the tiny
VLM, reading the JSON files directly) on (a) Related subsets and (b) the same amount of Unrelated
data, and reports accuracy on the target subset's test set. Expect a large gap in the default world
and ~0 (both near chance) in the --entangled world.

    python bench/check_synth_cg.py --data /tmp/mini [--target 3 --related 4,28 --seeds 0,1,2]

Augmentations that cross-modality transfer needs (DESIGN.md): random intensity inversion, colour/grey
jitter and instance normalisation (`--no-aug` switches them off to see the difference).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from medmat.catalog import load_catalog
from medmat.data.medmat_format import parse_question_choice


def load_subset(root: Path, no: int, split: str) -> list[dict]:
    path = root / "Aggregated_Subsets" / f"Subset--{no:02d}-{split}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def to_arrays(root: Path, recs: list[dict], vocab: dict[str, int]):
    imgs, opts, ans = [], [], []
    for r in recs:
        im = np.asarray(Image.open(root / r["image"]).convert("RGB"), dtype=np.float32) / 255.0
        _, options = parse_question_choice(r["Question-choice"])
        ids = [vocab.setdefault(o, len(vocab)) for o in options]
        ids += [-1] * (4 - len(ids))
        imgs.append(im.transpose(2, 0, 1))
        opts.append(ids)
        ans.append("ABCD".index(r["Answer-choice"]))
    return torch.tensor(np.stack(imgs)), torch.tensor(opts), torch.tensor(ans)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    inv = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    x = torch.where(inv, 1 - x, x)                                   # intensity polarity
    grey = x.mean(1, keepdim=True).expand_as(x)
    to_grey = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    x = torch.where(to_grey, grey, x)                                # colour vs grey
    mix = torch.eye(3) + 0.3 * torch.randn(n, 3, 3, generator=g)     # channel jitter
    return torch.einsum("nij,njhw->nihw", mix, x)


class Net(nn.Module):
    def __init__(self, n_labels: int, dim: int = 64, inorm: bool = True):
        super().__init__()
        self.inorm = inorm
        c = [3, 16, 32, dim]
        layers = []
        for a, b in zip(c[:-1], c[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(4, b), nn.ReLU(), nn.MaxPool2d(2)]
        self.cnn = nn.Sequential(*layers)
        self.labels = nn.Embedding(n_labels + 1, dim)

    def forward(self, x, opts):
        if self.inorm:   # instance normalisation: each image and channel to zero mean, unit variance
            x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-4)
        h = self.cnn(F.avg_pool2d(x, 2)).mean((2, 3))   # 32x32 is enough for the lesions; 4x cheaper
        e = self.labels(opts.clamp(min=0))
        s = (e * h[:, None]).sum(-1)
        return s.masked_fill(opts < 0, -1e9)


def train_eval(train, test, n_labels, seed, steps, aug):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Net(n_labels, inorm=aug)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    xi, xo, xa = train
    for step in range(steps):
        idx = torch.randint(0, len(xa), (64,), generator=g)
        x = xi[idx]
        if aug:
            x = augment(x, g)
        loss = F.cross_entropy(net(x, xo[idx]), xa[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(test[0], test[1]).argmax(1)
    return float((pred == test[2]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--target", type=int, default=3)
    ap.add_argument("--related", default="4,28")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--no-aug", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cat = load_catalog()
    related = [int(s) for s in args.related.split(",")]
    unrelated = cat.unrelated_subsets(cat.triplet_of_subset(args.target))
    vocab: dict[str, int] = {}
    rel = [r for s in related for r in load_subset(args.data, s, "train")]
    unrel_pool = [r for s in unrelated for r in load_subset(args.data, s, "train")]
    test = to_arrays(args.data, load_subset(args.data, args.target, "test"), vocab)
    chance = float(np.mean([1 / (o >= 0).sum().item() for o in test[1]]))
    rel_t = to_arrays(args.data, rel, vocab)
    print(f"target {args.target} ({cat.triplet_of_subset(args.target)}), test n={len(test[2])}, chance {chance:.3f}; "
          f"related {related} n={len(rel)}; unrelated pool {unrelated}")
    gaps = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        unrel = random.Random(seed).sample(unrel_pool, len(rel))
        unrel_t = to_arrays(args.data, unrel, vocab)
        t0 = time.perf_counter()
        a_rel = train_eval(rel_t, test, len(vocab), seed, args.steps, not args.no_aug)
        a_unr = train_eval(unrel_t, test, len(vocab), seed, args.steps, not args.no_aug)
        gaps.append(a_rel - a_unr)
        print(f"seed {seed}: Related {a_rel:.3f}  Unrelated {a_unr:.3f}  gap {100 * (a_rel - a_unr):+.1f} points "
              f"({time.perf_counter() - t0:.1f} s for both)", flush=True)
    print(f"mean gap {100 * np.mean(gaps):+.1f} points over {len(gaps)} seeds ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
