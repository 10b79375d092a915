"""Training-curve figure of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict[str, Any]], path: str, out_dim: int) -> None:
    """Loss, teacher entropy against ln K, KL(teacher ‖ student), k-NN top-1 and the linear probe's top-1 (the
    epochs that have one: the last), per epoch, into ``path`` (PNG)."""
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    ax = axes[0, 0]
    ax.plot(epochs, [r["loss"] for r in history], marker=".")
    ax.set(title="DINO loss", xlabel="epoch", ylabel="cross-entropy (nats)")
    ax = axes[0, 1]
    ax.plot(epochs, [r["teacher_entropy"] for r in history], marker=".", label="teacher entropy")
    ax.axhline(math.log(out_dim), color="tab:red", linestyle="--", label=f"ln K = {math.log(out_dim):.2f} (uniform)")
    ax.axhline(0.0, color="tab:gray", linestyle=":", label="0 (one-hot)")
    ax.set(title="teacher entropy (collapse monitor)", xlabel="epoch", ylabel="nats")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    ax.plot(epochs, [r["kl"] for r in history], marker=".")
    ax.set(title="KL(teacher ‖ student)", xlabel="epoch", ylabel="nats")
    ax = axes[1, 1]
    knn = [(r["epoch"], r["knn_top1"]) for r in history if r.get("knn_top1") is not None]
    linear = [(r["epoch"], r["linear_top1"]) for r in history if r.get("linear_top1") is not None]
    if knn:
        ax.plot(*zip(*knn), marker="o", label="k-NN")
    if linear:
        ax.plot(*zip(*linear), linestyle="none", marker="*", markersize=14, color="tab:red", label="linear probe")
    if knn or linear:
        ax.legend(fontsize=8)
    ax.set(title="k-NN and linear top-1 (teacher, held-out)", xlabel="epoch", ylabel="%")
    fig.savefig(path, dpi=100)
    plt.close(fig)
