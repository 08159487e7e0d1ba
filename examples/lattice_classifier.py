"""A torch classifier with a lattice layer, trained by backprop and plasticity together.

    python examples/lattice_classifier.py              # ~20 s on 2 CPU cores
    python examples/lattice_classifier.py --compile    # also times torch.compile against eager

The 8×8 digits (scikit-learn's bundled copy, no download) are encoded by a
linear layer into the drive of the lattice's input face (z = 0); a
``ck.nn.Lattice3d`` runs ``steps`` updates; a linear readout of the output face
(z = D−1) gives the class scores. Adam trains the encoder, the lattice weights
and the readout by backprop; after every optimiser step the lattice's local
rules (STDP, BCM, competition) update its weights too. Activity travels one
plane per update, so ``steps`` must be at least ``D − 1`` for the input to reach
the output face.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import cellkern as ck


class LatticeClassifier(nn.Module):
    def __init__(self, dims=(4, 8, 8), channels=2, steps=6, classes=10):
        super().__init__()
        D, H, W = dims
        self.dims, self.channels = dims, channels
        self.encode = nn.Linear(64, channels * H * W)
        self.lattice = ck.nn.Lattice3d(dims, channels, steps=steps, leak=0.5,
                                       boundary=("zero", "periodic", "periodic"))
        self.readout = nn.Linear(channels * H * W, classes)

    def forward(self, images):
        B = images.shape[0]
        D, H, W = self.dims
        face = self.encode(images.reshape(B, 64)).reshape(B, self.channels, 1, H, W)
        drive = torch.cat([face, face.new_zeros(B, self.channels, D - 1, H, W)], dim=2)
        s = self.lattice(drive.new_zeros(drive.shape), drive)
        return self.readout(s[:, :, -1].reshape(B, -1))


def digits(seed=0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 4
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def train(model, data, epochs, batch, lr):
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(ytr), generator=g).split(batch):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.lattice.plasticity_step()  # the local rules on the same weights
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {acc:.1%}, {time.perf_counter() - t0:.1f} s")
    return acc


def time_forward(fn, x, repeats=20):
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - t0) / repeats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) against eager")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = LatticeClassifier()
    acc = train(model, digits(), a.epochs, a.batch, a.lr)
    if a.compile:
        x = digits()[2][: a.batch]
        eager = time_forward(model, x)
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        compiled(x)
        print(f"compile: {time.perf_counter() - t0:.1f} s")
        fast = time_forward(compiled, x)
        print(f"forward of {a.batch} images: eager {eager * 1e3:.2f} ms, compiled {fast * 1e3:.2f} ms "
              f"({eager / fast:.2f}x)")
    return acc


if __name__ == "__main__":
    main()
