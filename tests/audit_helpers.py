"""Targets for the audit tests, trained the way a user would: a plain torch loop, no miafw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits


def digits(n_records: int = 0):
    """The digits records as a user loads them (scikit-learn, features / 16), in miafw's order."""
    x, y = load_digits(return_X_y=True)
    if n_records:
        x, y = x[:n_records], y[:n_records]
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def mlp(n_features: int, n_classes: int, width: int) -> torch.nn.Module:
    """The architecture of miafw's ``mlp:width=W`` (one hidden ReLU layer), with the same names."""
    return torch.nn.Sequential(torch.nn.Linear(n_features, width), torch.nn.ReLU(), torch.nn.Linear(width, n_classes))


def train_plain(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, members: np.ndarray, *, epochs: int,
                lr: float = 2e-3, batch_size: int = 64, seed: int = 1) -> torch.nn.Module:
    """Adam on cross-entropy over shuffled mini-batches of the members: miafw's default recipe,
    written the textbook way."""
    g = torch.Generator().manual_seed(seed)
    xm = torch.from_numpy(x[members])
    ym = torch.from_numpy(y[members])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(ym), generator=g)
        for i in range(0, len(ym), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xm[b]), ym[b]).backward()
            opt.step()
    return net


def half(n: int, seed: int = 1) -> np.ndarray:
    """A random half of ``n`` records, as the user drew the training set."""
    return np.random.default_rng(seed).random(n) < 0.5


def save_target(directory: Path, net: torch.nn.Module, x: np.ndarray, members: np.ndarray, *, ids=None):
    """Write what a user brings to an audit: the state_dict, a members file (one id per line),
    the logits and the probabilities on every record. Returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(x)) if ids is None else np.asarray(ids)
    torch.save(net.state_dict(), directory / "target.pt")
    np.savetxt(directory / "members.txt", ids[members], fmt="%d")
    with torch.no_grad():
        z = net(torch.from_numpy(x))
    np.savez(directory / "logits.npz", logits=z.numpy())
    np.savez(directory / "probs.npz", probs=torch.softmax(z.double(), dim=1).numpy())
    return {"weights": directory / "target.pt", "members": directory / "members.txt",
            "logits": directory / "logits.npz", "probs": directory / "probs.npz"}
