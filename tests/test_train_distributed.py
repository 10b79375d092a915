"""`dino.train` under DDP: 2 CPU processes with gloo (what `torchrun --nproc_per_node=2 -m dino.train` sets up).

The ranks are pinned to the CPU (``device="cpu"``), also on a GPU machine, where ``auto`` would put rank 1 on a
cuda:1 that a one-GPU machine lacks. Training augments, so the test needs kornia (skipped without it).

Checks that the ranks stay in lockstep (identical student and teacher weights and DINO center after training: DDP
averages gradients, the center update all-reduces the teacher batch means), that each rank saw its own half of the
data, and that only rank 0 evaluated and wrote the run directory.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import dino.train as train_mod
from dino.checkpoint import load_checkpoint
from dino.config import resolve_config

pytest.importorskip("kornia", reason="training augments, which needs kornia (pip install kornia)")

WORLD_SIZE = 2
CONFIG = {
    "preset": "cpu-tiny", "device": "cpu", "embed_dim": 32, "depth": 2, "num_heads": 2, "batch_size": 64,
    "n_local_crops": 2, "out_dim": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32, "num_workers": 0,
    "progress": False, "epochs": 2, "warmup_epochs": 1, "eval_every": 1,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE)})
    torch.set_num_threads(1)
    values = {**CONFIG, "output_dir": os.path.join(out_dir, "run")}
    trainer = train_mod.Trainer(resolve_config(values), values)
    history = trainer.fit()
    seen = sorted(trainer.sampler)  # this rank's share of the last epoch
    torch.save({"student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict(),
                "center": trainer.center, "history": history, "seen": seen, "steps": trainer.iters_per_epoch},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_run(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    # 1257 digits / (2 ranks x 64) = 9 steps per epoch; disjoint halves of the data per rank.
    assert ranks[0]["steps"] == 1257 // (WORLD_SIZE * 64)
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    for key in ("student", "teacher"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name} differs between ranks"
    assert torch.equal(ranks[0]["center"], ranks[1]["center"])
    assert ranks[0]["center"].abs().sum() > 0
    # Rank 0 evaluated; the other rank did not (its history has no k-NN), and rank 0 wrote the run directory.
    assert all(r["knn_top1"] is not None for r in ranks[0]["history"])
    assert all(r["knn_top1"] is None for r in ranks[1]["history"])
    run = tmp_path / "run"
    state = load_checkpoint(str(run))
    assert state["epoch"] == 2 and state["step"] == 2 * ranks[0]["steps"]
    assert torch.equal(state["center"], ranks[0]["center"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert (run / "curves.png").stat().st_size > 0
