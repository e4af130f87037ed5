"""Peak memory and time of the DINO/iBOT soft cross-entropy over 65,536 and 131,072 prototypes: dinoforge's chunked
`soft_cross_entropy` vs the unchunked formula −Σ t·log_softmax(s/T) (the official code's), forward + backward.

Each measurement runs in a fresh spawned process at one thread: the logits [rows, K] (fp32 or bf16, requiring
gradients) and the fp32 teacher probabilities are allocated first, the kernel's resident-set high-water mark is reset
(Linux /proc/self/clear_refs), then one forward + backward; `peak_mb` is the high-water mark above the resident set
before it (the gradient of the logits included). Prints one JSON line per measurement and one ratio line
(chunked ÷ unchunked peak) per prototype count and dtype.

    python benchmarks/loss_memory.py                  # rows 2048, K 65536 and 131072, fp32 and bf16 logits
    python benchmarks/loss_memory.py --rows 4096 --dtypes fp32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unchunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """The peer: the whole [rows, K] log-softmax at once, as the official losses compute it."""
    return -(targets * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _measure(impl: str, rows: int, k: int, dtype: str, conn) -> None:
    from dinoforge.losses.cross_entropy import soft_cross_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = (3 * torch.randn(rows, k)).to(DTYPES[dtype]).requires_grad_()
    targets = torch.softmax(torch.randn(rows, k) / 0.05, dim=-1)
    fn = soft_cross_entropy if impl == "chunked" else unchunked_cross_entropy
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # high-water mark := current resident set (drops the inputs' construction temporaries)
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    fn(logits, targets, 0.1).mean().backward()
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM") - before
    conn.send({"peak_mb": peak, "seconds": seconds, "grad_norm": logits.grad.float().norm().item()})


def measure(impl: str, rows: int, k: int, dtype: str) -> dict:
    """One forward + backward in a fresh process; its peak memory above the inputs and its time."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_measure, args=(impl, rows, k, dtype, child))
    proc.start()
    out = parent.recv()
    proc.join()
    inputs_mb = rows * k * (DTYPES[dtype].itemsize + 4) / 2**20
    return {"bench": "loss_memory", "impl": impl, "rows": rows, "prototypes": k, "logits_dtype": dtype,
            "inputs_mb": inputs_mb, **out}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="student rows (CLS crops or masked patches)")
    ap.add_argument("--prototypes", type=int, nargs="+", default=[65536, 131072])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    args = ap.parse_args()
    for k in args.prototypes:
        for dtype in args.dtypes:
            got = {impl: measure(impl, args.rows, k, dtype) for impl in ("unchunked", "chunked")}
            for r in got.values():
                print(json.dumps(r), flush=True)
            c, u = got["chunked"], got["unchunked"]
            ratio = {"ratio": "chunked/unchunked peak_mb", "rows": args.rows, "prototypes": k, "logits_dtype": dtype,
                     "value": c["peak_mb"] / u["peak_mb"], "time_ratio": c["seconds"] / u["seconds"],
                     "grad_norm_rel_diff": abs(c["grad_norm"] - u["grad_norm"]) / u["grad_norm"]}  # fmt: skip
            print(json.dumps(ratio), flush=True)


if __name__ == "__main__":
    main()
