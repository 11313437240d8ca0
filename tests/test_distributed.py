"""Data parallelism over processes (torchrun, DDP, FSDP2 with gloo on CPU): each rank's share of
every batch, the launch, and deterministic equality of the losses with one process.

Tolerance: with AdamW, the losses of 2 processes equal one process's within a relative 1e-5
(measured: 1e-7 to 1.2e-6 over 20 steps). The two differ only in float32 reduction order: each
rank's mean over its half of the rows and the average of the two means, gradients summed in
another order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_GRID

from lmlab.cli import main
from lmlab.config.schema import ModelConfig, TrainConfig
from lmlab.data.dataset import random_batch, sequential_batch
from lmlab.distributed.group import Ranks, join, torchrun_command
from lmlab.distributed.sharded import load_model_and_optimizers
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_sharded_checkpoint
from lmlab.train.export import load_ternary
from lmlab.train.optim import build_optimizers
from lmlab.train.run import load_trained_model
from lmlab.train.trainer import check_batch_split

TINY = TINY_GRID
LOSS_RTOL = 1e-5


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_ranks_batches_together_are_the_one_process_batch(world_size):
    tokens = torch.arange(5000).numpy() % 97
    for step in range(3):
        x, y = random_batch(tokens, step, 8, 16, seed=3)
        parts = [random_batch(tokens, step, 8, 16, 3, (r, world_size)) for r in range(world_size)]
        assert all(part[0].shape == (8 // world_size, 16) for part in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
    x, _ = sequential_batch(tokens, 64, 8, 16)
    parts = [sequential_batch(tokens, 64, 8, 16, (r, world_size))[0] for r in range(world_size)]
    assert torch.equal(torch.cat(parts), x)


def test_a_batch_that_does_not_split_over_the_processes_is_one_clear_error():
    with pytest.raises(LmlabError, match=r"train.batch_size=6 .* multiple of 4$"):
        check_batch_split(TrainConfig(batch_size=6), Ranks(0, 4))
    check_batch_split(TrainConfig(batch_size=8), Ranks(1, 4))


def test_several_processes_need_a_parallel_mode(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LmlabError, match=r"train\.parallel=none.*train\.parallel=ddp"):
        join("none", torch.device("cpu"), 10)


def test_nproc_launches_torchrun_with_the_same_arguments():
    command = torchrun_command(2, ["train", "gpt-tiny", "train.parallel=ddp"])
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lmlab",
        "train",
        "gpt-tiny",
        "train.parallel=ddp",
    ]


def train_rows(run: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["kind"] == kind]


def test_two_processes_with_ddp_or_fsdp_give_the_one_process_losses(tmp_path):
    """20 steps with 2 micro-batches each; only rank 0 writes, with every rank's numbers."""
    settings = [*TINY, "train.max_steps=20", "train.grad_accum=2", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=one"]) == 0
    one = [row["loss"] for row in train_rows(tmp_path / "one")]
    assert len(one) == 20
    for parallel in ("ddp", "fsdp"):
        args = ["train", "--nproc", "2", "--quiet", *settings, f"train.parallel={parallel}"]
        assert main([*args, f"name={parallel}"]) == 0
        rows = train_rows(tmp_path / parallel)
        assert [row["step"] for row in rows] == list(range(1, 21))  # one writer
        assert [row["loss"] for row in rows] == pytest.approx(one, rel=LOSS_RTOL)
        for row in rows:
            assert len(row["ranks"]["tokens_per_s"]) == 2
            assert all(ms > 0 for ms in row["ranks"]["comm_ms"])
        summary = json.loads((tmp_path / parallel / "summary.json").read_text())
        assert (summary["processes"], summary["parallel"], summary["steps"]) == (2, parallel, 20)
        assert summary["val_loss"] == pytest.approx(
            json.loads((tmp_path / "one" / "summary.json").read_text())["val_loss"], rel=1e-5
        )


WORKER = Path(__file__).parent / "distributed_worker.py"


def torchrun_worker(tmp_path: Path, env: dict[str, str], *settings: str) -> subprocess.Popen:
    """A 2-rank job of ``distributed_worker.py`` (lmlab with a rank that may break)."""
    command = [*torchrun_command(2, [])[:-2], str(WORKER), "train", "--quiet", *TINY]
    return subprocess.Popen(
        [*command, *settings, f"out_dir={tmp_path}", "name=job"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_rank_that_fails_ends_the_job_with_its_error(tmp_path):
    job = torchrun_worker(
        tmp_path, {"LMLAB_TEST_FAIL": "1:3"}, "train.parallel=ddp", "train.max_steps=100000"
    )
    _, stderr = job.communicate(timeout=300)  # a hang fails the test here
    assert job.returncode != 0
    assert "RuntimeError: rank 1 broke after step 3" in stderr


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_job_after_the_timeout(tmp_path):
    job = torchrun_worker(
        tmp_path,
        {"LMLAB_TEST_HANG": "1:3"},
        "train.parallel=ddp",
        "train.max_steps=100000",
        "train.comm_timeout=5",
    )
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "[rank0]" in stderr and "Timed out waiting 5000ms" in stderr


@pytest.mark.slow
def test_sigterm_stops_every_rank_after_a_common_save_and_the_run_resumes(tmp_path):
    settings = [*TINY, "train.parallel=fsdp", "train.max_steps=100000", "train.eval_interval=1000"]
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmlab",
            "train",
            "--nproc",
            "2",
            "--quiet",
            *settings,
            f"out_dir={tmp_path}",
            "name=job",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "job" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(train_rows(tmp_path / "job")) >= 3):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert "interrupted; continue with: lmlab train --resume" in stderr
    last = train_rows(tmp_path / "job")[-1]["step"]
    assert [path.name for path in list_checkpoints(tmp_path / "job")][-1] == f"step_{last:08d}"
    assert (
        main(["train", "--quiet", "--resume", str(tmp_path / "job"), f"train.max_steps={last + 2}"])
        == 0
    )
    assert [row["step"] for row in train_rows(tmp_path / "job")] == list(range(1, last + 3))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_sharded_checkpoint_gives_back_weights_optimiser_and_rng_exactly(tmp_path, optimizer):
    config = TrainConfig(optimizer=optimizer)
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2))
    optimizers = build_optimizers(model, config)
    for _ in range(2):
        model(torch.randint(0, 40, (2, 12)))[0].float().square().mean().backward()
        optimizers.step()
    path = save_sharded_checkpoint(tmp_path, 2, model, optimizers.optimizers, {"step": 2}, Ranks())
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["layout"], manifest["world_size"]) == ("sharded", 1)
    assert any(name.startswith("state/") for name in manifest["files"])
    rng = torch.get_rng_state()

    torch.manual_seed(1)
    copy = LanguageModel(ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2))
    copy_optimizers = build_optimizers(copy, config)
    checkpoint = load_latest_checkpoint(tmp_path)
    load_model_and_optimizers(
        copy, copy_optimizers.optimizers, checkpoint.sharded, checkpoint.optimizer
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(copy.state_dict()[name], tensor), name
    assert copy.head.weight is copy.embed.weight
    saved, loaded = optimizers.state_dict(model), copy_optimizers.state_dict(copy)
    for name in saved:
        assert saved[name]["param_groups"] == loaded[name]["param_groups"]
        for fqn, moments in saved[name]["state"].items():
            for key, value in moments.items():
                assert torch.equal(loaded[name]["state"][fqn][key], value), (fqn, key)
    assert torch.equal(checkpoint.rng_of(0)["torch"], rng)
    assert checkpoint.rng_of(3) is checkpoint.rng  # a rank the saving job lacked


@pytest.mark.slow
def test_resume_at_another_world_size_continues_the_same_run(tmp_path):
    """2 -> 1 and 1 -> 2 processes (FSDP2, sharded checkpoints): the losses after the resume
    are the uninterrupted run's; eval and generate read the sharded checkpoint directly."""
    settings = [
        *TINY,
        "train.parallel=fsdp",
        "train.schedule=constant",  # a budget extended on resume keeps the same rates
        "train.checkpoint_interval=4",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", "--quiet", *settings, "train.max_steps=8", "name=whole"]) == 0
    whole = [row["loss"] for row in train_rows(tmp_path / "whole")]
    for name, first, then in (("two_one", ["--nproc", "2"], []), ("one_two", [], ["--nproc", "2"])):
        assert (
            main(["train", "--quiet", *first, *settings, "train.max_steps=4", f"name={name}"]) == 0
        )
        run = tmp_path / name
        resume = ["train", "--quiet", *then, "--resume", str(run), "train.max_steps=8"]
        assert main(resume) == 0
        assert [row["loss"] for row in train_rows(run)] == pytest.approx(whole, rel=LOSS_RTOL)
    sharded = list_checkpoints(tmp_path / "two_one")[0]
    assert sorted(p.name for p in sharded.glob("rng-*.json")) == [
        "rng-00000.json",
        "rng-00001.json",
    ]
    assert main(["eval", str(tmp_path / "two_one"), "--batches", "1"]) == 0  # step 8: 1 process
    two = list_checkpoints(tmp_path / "one_two")[-1]
    assert json.loads((two / "manifest.json").read_text())["layout"] == "sharded"
    assert main(["generate", str(tmp_path / "one_two"), "--max-new-tokens", "4"]) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_on_127_0_0_1_act_as_two_nodes(tmp_path):
    """``torchrun --nnodes 2 --node_rank R --master_addr --master_port`` once per "node"."""
    settings = [*TINY, "train.max_steps=6", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=one"]) == 0
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "lmlab",
                "train",
                "--quiet",
                *settings,
                "train.parallel=ddp",
                "name=nodes",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        node.communicate(timeout=300)
        assert node.returncode == 0
    one = [row["loss"] for row in train_rows(tmp_path / "one")]
    rows = train_rows(tmp_path / "nodes")
    assert [row["loss"] for row in rows] == pytest.approx(one, rel=LOSS_RTOL)
    assert all(len(row["ranks"]["step_ms"]) == 2 for row in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_device_trains_on_cuda_in_bf16_compiled(tmp_path):
    settings = [s for s in TINY if not s.startswith("train.precision")]
    args = ["train", "--quiet", *settings, "train.max_steps=3", "train.compile=true"]
    assert main([*args, "train.device=auto", f"out_dir={tmp_path}", "name=gpu"]) == 0
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl)")
def test_two_gpus_with_nccl_give_the_one_gpu_losses(tmp_path):
    settings = [*TINY, "train.max_steps=10", "train.device=cuda", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=one"]) == 0
    args = ["train", "--nproc", "2", "--quiet", *settings, "train.parallel=fsdp", "name=two"]
    assert main(args) == 0
    one = [row["loss"] for row in train_rows(tmp_path / "one")]
    assert [row["loss"] for row in train_rows(tmp_path / "two")] == pytest.approx(one, rel=1e-4)


def test_eval_generate_and_export_read_a_sharded_checkpoint(tmp_path, capsys):
    """A sharded checkpoint written into a trained run (as a job would) is what the commands
    that read a run use, with the same weights."""
    settings = [*TINY, "model.bitlinear=true", "train.max_steps=2", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=run"]) == 0
    run = tmp_path / "run"
    config, model, _, _ = load_trained_model(run)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)  # weights no single-file checkpoint holds
    optimizers = build_optimizers(model, config.train)
    save_sharded_checkpoint(run, 3, model, optimizers.optimizers, {"step": 3}, Ranks())
    _, loaded, _, step = load_trained_model(run)
    assert step == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "ternary.safetensors")]) == 0
    assert load_ternary(tmp_path / "ternary.safetensors")[3] == 3
