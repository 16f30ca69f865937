"""Distribution overhead on one machine: STEGO head steps by 2 processes x 1 thread (gloo, the DDP path of
``trainer.devices=2``) against 1 process x 2 threads, the same global batch, measured side by side.

Each process runs what a DDP rank runs in training: the head on its share of cached features, the gather of the
global batch (:func:`stego_core.runtime.distributed.all_gather_with_grad`), STEGO's loss on it, the backward pass, the
mean of the gradients over ranks (one flat all-reduce, as DDP) and an Adam step. Printed: crops per second of
each arrangement, their ratio (distributed / single; 1.0 = no overhead) and each process's peak resident memory.
The two arrangements alternate ``--rounds`` times (the machine is shared, so the ratio of neighbours is the number
to read). On a GPU machine ``--device cuda`` times the single-process arrangement at 1 device.

    python benchmarks/bench_distributed.py [--steps 30] [--batch 16] [--dim 384] [--grid 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_steps(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """``args.steps`` timed head steps (after 3 warm-up steps) on random features; this process's share ``batch``."""
    from stego_core.methods.stego.model import (
        ClusterProbe,
        LossConfig,
        StegoHead,
        correspondence_loss,
    )
    from stego_core.runtime import distributed

    torch.manual_seed(0)
    device = args.device
    head, probe = StegoHead(args.dim, 70, dropout=0.0).to(device), ClusterProbe(70, 8).to(device)
    params = [*head.parameters(), *probe.parameters()]
    opt = torch.optim.Adam(params, lr=1e-4)
    cfg = LossConfig()
    gen = torch.Generator(device=device).manual_seed(0)
    feats = torch.randn(batch, args.dim, args.grid, args.grid, device=device)
    knn = torch.randn(batch, args.dim, args.grid, args.grid, device=device)

    def step() -> None:
        codes, knn_codes = head(feats), head(knn)
        f, c, kf, kc = (distributed.all_gather_with_grad(t) for t in (feats, codes, knn, knn_codes))
        loss, _ = correspondence_loss(f, c, kf, kc, cfg, generator=gen)
        total = loss + probe(c.detach())[0]
        opt.zero_grad()
        total.backward()
        distributed.average_gradients(params)
        opt.step()

    for _ in range(3):
        step()
    distributed.barrier()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "crops_per_s": args.steps * batch * distributed.world_size() / elapsed,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(args: argparse.Namespace) -> None:
    """One rank of the torchrun arrangement: 1 thread, half the global batch; rank 0 writes the result."""
    from stego_core.runtime import distributed
    torch.set_num_threads(1)
    distributed.init_from_env()
    n = distributed.world_size()
    result = run_steps(args, args.batch // n)
    every = distributed.gather_objects(result)
    if distributed.is_main():
        Path(args.out).write_text(json.dumps({"crops_per_s": every[0]["crops_per_s"],
                                              "peak_rss_mb": [r["peak_rss_mb"] for r in every]}))


def distributed_round(args: argparse.Namespace, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--out", str(out),
               "--steps", str(args.steps), "--batch", str(args.batch), "--dim", str(args.dim),
               "--grid", str(args.grid)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="global batch (split over the processes)")
    p.add_argument("--dim", type=int, default=384, help="feature channels (ViT-S: 384)")
    p.add_argument("--grid", type=int, default=8, help="feature map side (h = w)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    if args.worker:
        worker(args)
        return
    print(f"# {os.cpu_count()} CPUs, torch {torch.__version__}, global batch {args.batch}, features "
          f"({args.dim}, {args.grid}, {args.grid}), {args.steps} steps per measurement, device {args.device}")
    ratios = []
    for r in range(args.rounds):
        torch.set_num_threads(args.nproc)
        single = run_steps(args, args.batch)
        if args.device != "cpu":
            print(f"round {r}: 1 process on {args.device}: {single['crops_per_s']:.1f} crops/s, "
                  f"peak RSS {single['peak_rss_mb']:.0f} MB")
            continue
        dist = distributed_round(args, args.nproc)
        ratio = dist["crops_per_s"] / single["crops_per_s"]
        ratios.append(ratio)
        print(f"round {r}: 1 process x {args.nproc} threads {single['crops_per_s']:.1f} crops/s "
              f"(peak RSS {single['peak_rss_mb']:.0f} MB); {args.nproc} processes x 1 thread "
              f"{dist['crops_per_s']:.1f} crops/s (peak RSS per rank "
              f"{', '.join(f'{m:.0f}' for m in dist['peak_rss_mb'])} MB); ratio {ratio:.2f}")
    if ratios:
        print(f"ratio distributed / single: {min(ratios):.2f}-{max(ratios):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
