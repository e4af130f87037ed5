"""A lost worker survived: `torchrun --max-restarts 1 ... train --resume` on CPU (gloo) over tar shards, one of the
two workers SIGKILLed mid-run; torchrun restarts the group, which resumes from the last checkpoint, and the finished
run equals an uninterrupted two-process run, metrics and teacher bit for bit; and restarted workers join a fresh
process group (not the dead workers' addresses left in torchrun's store)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli_errors import CLI_ENV
from test_train import assert_same_run
from test_train_cli import KILL_RUN, _logged_iterations

from dinoforge.data.datasets import BundledDataset
from dinoforge.data.pack import pack_shards
from dinoforge.train.checkpoint import list_checkpoints, load_checkpoint


def _torchrun(out: Path, spec: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *extra,
        "-m",
        "dinoforge.cli",
        "train",
        "-c",
        "demo",
        "--data",
        spec,
        "-o",
        str(out),
        *KILL_RUN,
        "train.batch_size_per_gpu=16",
        "--resume",
    ]


def _worker(agent: int, local_rank: int) -> int | None:
    """The pid of the torchrun agent's worker process with LOCAL_RANK `local_rank`, None before it started."""
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(pid)
    return None


def _stop(proc: subprocess.Popen) -> None:
    """Kill a torchrun that has not ended, its workers first (they run in their own sessions and would outlive it)."""
    if proc.poll() is None:
        for pid in filter(None, (_worker(proc.pid, rank) for rank in (0, 1))):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_worker_killed_under_torchrun_max_restarts_resumes_to_the_same_run(tmp_path, kill_points):
    spec = pack_shards(BundledDataset("val"), tmp_path / "shards", max_images=500)["spec"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    r = subprocess.run(_torchrun(ref, spec), env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    kill_at = kill_points.randint(6, 18)  # past the checkpoint of iteration 5
    why = f"kill at iteration {kill_at}, {kill_points}"
    log = tmp_path / "torchrun.log"  # a file, not a pipe: nobody reads a pipe while the run goes on
    with open(log, "wb") as out:
        proc = subprocess.Popen(_torchrun(part, spec, "--max-restarts=1"), env=CLI_ENV, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 240
        while _logged_iterations(part) <= kill_at:
            assert proc.poll() is None, f"the run ended first ({why}): {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"timed out waiting ({why})"
            time.sleep(0.02)
        victim = _worker(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        newest = load_checkpoint(list_checkpoints(part / "checkpoints")[-1])["iteration"]
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the restarted run did not finish ({why}): {log.read_text()[-3000:]}")
    finally:
        _stop(proc)
    stderr = log.read_text()
    assert proc.returncode == 0, (why, stderr[-3000:])
    assert 5 <= newest < kill_at + 1, (why, newest)
    assert f"resuming from {part / 'checkpoints'}" in stderr, (why, stderr[-3000:])  # the restarted group
    assert_same_run(ref, part)


RESTARTED = """
import os, signal, time
import torch, torch.distributed as dist
from dinoforge.distributed import init_from_env
rank, restart = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if restart == 1 and rank == 1:
    time.sleep(5)  # the new rank 1 joins late: rank 0 must not take the dead rank 1's address from the store
init_from_env("cpu")
t = torch.ones(1)
dist.all_reduce(t)
print(f"attempt {restart} rank {rank} sum {t.item():.0f}", flush=True)
if restart == 0:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_restarted_workers_join_a_fresh_process_group(tmp_path):
    """torchrun keeps one store across restarts: without a prefix per restart, the restarted rank 0 reads the killed
    rank 1's gloo address and hangs connecting to it (what the kill test above met under load)."""
    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, str(script)], env=CLI_ENV, stdout=out, stderr=out)
    try:
        proc.wait(timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the restarted workers hung: {log.read_text()[-3000:]}")
    finally:
        _stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert sorted(line for line in log.read_text().splitlines() if " sum " in line) == [
        f"attempt {a} rank {k} sum 2" for a in (0, 1) for k in (0, 1)
    ]
