"""Checkpoints: exact round trips, bit-identical resume, corruption fallback, pruning, SIGKILL."""

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, train_losses
from torch import nn

from lmlab.files import atomic_write_json, atomic_write_text
from lmlab.train.checkpoint import (
    MANIFEST_FILE,
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a shared machine, thread contention costs far more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(actual, expected, where="top"):
    """Equal values *and* types: tuples stay tuples, int keys stay ints, tensors keep dtype/bits."""
    if isinstance(expected, dict):  # an OrderedDict state dict may come back as a plain dict
        assert isinstance(actual, dict), f"{where}: {type(actual)} is not a dict"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        assert [type(k) for k in actual] == [type(k) for k in expected], f"{where}: key types"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}/{key}")
        return
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}/{i}")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), where
    else:
        assert actual == expected, where


class TinyLM(nn.Module):
    """Tied embedding/head, a hidden matrix for Muon, a norm, and dropout so RNG matters."""

    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.hidden(self.embed(tokens))))
        return self.head(self.norm(x))


def make_model(seed: int) -> tuple[TinyLM, dict[str, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    model = TinyLM()
    muon = torch.optim.Muon([model.hidden.weight], lr=0.02)
    rest = [p for n, p in model.named_parameters() if n != "hidden.weight"]
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.ndim == 2], "weight_decay": 0.1},
            {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    return model, {"muon": muon, "adamw": adamw}


def train(model: TinyLM, optimizers: dict[str, torch.optim.Optimizer], steps: int) -> None:
    """Batches come from the global torch RNG, so an exact resume needs the RNG restored."""
    for _ in range(steps):
        tokens = torch.randint(0, 32, (4, 9))
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()


def optimizer_states(optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    return {name: opt.state_dict() for name, opt in optimizers.items()}


def test_model_optimizer_and_trainer_states_round_trip_exactly(tmp_path):
    model, optimizers = make_model(0)
    train(model, optimizers, 3)
    model_state = model.state_dict()
    opt_state = optimizer_states(optimizers)
    trainer_state = {
        "step": 3,
        "best_val_loss": math.inf,
        "worst": -math.inf,
        "undefined": math.nan,
        "tiny": 5e-324,
        "done": False,
        "note": None,
        "name": "run",
        "pair": (1, 2.5),
        "nested": [(1,), {"a": [None, True]}],
        "by_id": {3: "three", 1.5: "float key", None: 0},
        "__tuple__": "a key that looks like a tag",
        "carried": {"k": torch.randn(2, 3), "v": torch.zeros(2, 3, dtype=torch.bfloat16)},
    }
    save_checkpoint(tmp_path, 3, model_state, opt_state, trainer_state)
    warnings = []
    checkpoint = load_latest_checkpoint(tmp_path, warnings.append)

    assert warnings == []
    assert checkpoint.step == 3
    assert checkpoint.path == tmp_path / "checkpoints" / "step_00000003"
    assert_same(checkpoint.model, model_state)
    assert checkpoint.model["head.weight"] is checkpoint.model["embed.weight"]
    assert_same(checkpoint.optimizer, opt_state)
    assert_same(checkpoint.trainer, trainer_state)
    assert checkpoint.optimizer["adamw"]["state"][0]["step"].dim() == 0
    assert isinstance(checkpoint.optimizer["muon"]["param_groups"][0]["ns_coefficients"], tuple)

    _, fresh = make_model(1)
    for name, optimizer in fresh.items():
        optimizer.load_state_dict(checkpoint.optimizer[name])
        assert_same(optimizer.state_dict(), opt_state[name], name)


def test_resume_continues_bit_identically(tmp_path):
    model, optimizers = make_model(0)
    train(model, optimizers, 3)
    save_checkpoint(tmp_path, 3, model.state_dict(), optimizer_states(optimizers), {"step": 3})
    train(model, optimizers, 4)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1234)
    checkpoint = load_latest_checkpoint(tmp_path)
    resumed, resumed_optimizers = make_model(1)
    resumed.load_state_dict(checkpoint.model)
    for name, optimizer in resumed_optimizers.items():
        optimizer.load_state_dict(checkpoint.optimizer[name])
    restore_rng_state(checkpoint.rng)
    train(resumed, resumed_optimizers, 4)

    assert_same(resumed.state_dict(), uninterrupted)


def draw() -> tuple:
    return (
        torch.rand(4).tolist(),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        random.random(),
        random.gauss(0.0, 1.0),
    )


def test_rng_restore_reproduces_random_numbers(tmp_path):
    random.gauss(0.0, 1.0)  # leaves a cached gaussian in python's and numpy's state
    np.random.standard_normal()
    save_checkpoint(tmp_path, 1, {}, {}, {})
    expected = draw()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert draw() != expected
    restore_rng_state(load_latest_checkpoint(tmp_path).rng)
    assert draw() == expected


def test_explicit_rng_state_is_the_one_saved(tmp_path):
    state = capture_rng_state()
    expected = draw()
    save_checkpoint(tmp_path, 1, {}, {}, {}, rng=state)
    restore_rng_state(load_latest_checkpoint(tmp_path).rng)
    assert draw() == expected


def test_awkward_tensors_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "transposed": base.t(),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "int8": torch.tensor([-3, 0, 5], dtype=torch.int8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 3),
        "empty_too": torch.zeros(0, 3),
        "base": base,
        "alias": base,
        "row": base[1],
        "columns": base[:, 1:3],
    }
    save_checkpoint(tmp_path, 1, state, {}, {})
    loaded = load_latest_checkpoint(tmp_path).model
    assert_same(loaded, state)
    assert loaded["alias"] is loaded["base"]
    assert loaded["columns"].is_contiguous()
    assert loaded["empty"] is not loaded["empty_too"]


def test_unstorable_state_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="cannot store object at carried"):
        save_checkpoint(tmp_path, 1, {}, {}, {"carried": object()})
    assert list_checkpoints(tmp_path) == []
    assert not (tmp_path / "checkpoints").exists()


def save_step(run_dir: Path, step: int, keep_last: int = 10) -> Path:
    model = {"w": torch.full((64,), float(step)), "scale": torch.tensor(float(step))}
    optimizer = {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": []}
    return save_checkpoint(run_dir, step, model, optimizer, {"step": step}, keep_last=keep_last)


def truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0x01
    (path / "optimizer.safetensors").write_bytes(bytes(data))


def drop_manifest(path: Path) -> None:
    (path / MANIFEST_FILE).unlink()


def unparsable_json_with_matching_checksum(path: Path) -> None:
    """Damage that a checksum cannot see: the manifest is rewritten to match the junk."""
    junk = b"{not json"
    (path / "trainer.json").write_bytes(junk)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["files"]["trainer.json"] = {
        "bytes": len(junk),
        "sha256": hashlib.sha256(junk).hexdigest(),
    }
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncate, "model.safetensors: truncated ("),
        (flip_byte, "optimizer.safetensors: checksum mismatch"),
        (drop_manifest, "manifest.json: missing"),
        (unparsable_json_with_matching_checksum, "trainer.json: unreadable (JSONDecodeError)"),
    ],
)
def test_damaged_newest_checkpoint_falls_back_with_one_line(tmp_path, damage, reason):
    save_step(tmp_path, 100)
    newest = save_step(tmp_path, 200)
    damage(newest)
    warnings = []
    checkpoint = load_latest_checkpoint(tmp_path, warnings.append)
    assert checkpoint.step == 100
    assert torch.equal(checkpoint.model["w"], torch.full((64,), 100.0))
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint step_00000200 is corrupt ({reason}")
    assert warnings[0].endswith("); using step_00000100")
    assert "\n" not in warnings[0]


def test_no_valid_checkpoint_returns_none(tmp_path):
    assert load_latest_checkpoint(tmp_path, lambda line: pytest.fail(line)) is None
    for step in (1, 2):
        flip_byte(save_step(tmp_path, step))
    warnings = []
    assert load_latest_checkpoint(tmp_path, warnings.append) is None
    assert [w.split(" is ")[0] for w in warnings] == [
        "checkpoint step_00000002",
        "checkpoint step_00000001",
    ]
    assert all(w.endswith("; no valid checkpoint left") for w in warnings)


def test_keep_last_prunes_older_checkpoints(tmp_path):
    for step in range(1, 6):
        save_step(tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000004",
        "step_00000005",
    ]


def test_saving_an_earlier_step_replaces_it_and_drops_the_abandoned_future(tmp_path):
    for step in (10, 20, 30):
        save_step(tmp_path, step)
    model = {"w": torch.ones(3)}
    save_checkpoint(tmp_path, 20, model, {}, {"step": 20, "timeline": 2}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020"]
    checkpoint = load_latest_checkpoint(tmp_path)
    assert checkpoint.trainer == {"step": 20, "timeline": 2}
    assert_same(checkpoint.model, model)


def test_steps_sort_numerically_beyond_eight_digits(tmp_path):
    save_step(tmp_path, 99_999_999)
    save_step(tmp_path, 100_000_000)
    assert load_latest_checkpoint(tmp_path).step == 100_000_000


def test_stale_tmp_dir_is_ignored_then_cleaned(tmp_path):
    good = save_step(tmp_path, 200)
    stale = good.with_name(".tmp-step_00000300")
    shutil.copytree(good, stale)
    (stale / "model.safetensors").write_bytes(b"half")
    checkpoint = load_latest_checkpoint(tmp_path, lambda line: pytest.fail(line))
    assert checkpoint.step == 200
    save_step(tmp_path, 250)
    assert sorted(p.name for p in good.parent.iterdir()) == ["step_00000200", "step_00000250"]


# One interpreter imports torch once (that import is most of the cost) and forks a writer per
# run; it forks before any torch op has started a thread pool, so the children are sound.
KILLER = """
import os, random, signal, sys, time
import torch
from lmlab.train.checkpoint import save_checkpoint


def save_forever(run_dir, out):
    step = 0
    while True:
        step += 1
        w = torch.full((128, 256), float(step))
        optimizer = {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": []}
        save_checkpoint(run_dir, step, {"w": w, "tied": w}, optimizer, {"step": step}, keep_last=2)
        os.write(out, b"%d\\n" % step)


rng = random.Random(0)
for run_dir in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            save_forever(run_dir, write)
        finally:
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as reports:
        first = reports.readline()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(int([first, *reports.read().split()][-1]), flush=True)
"""


def test_sigkill_at_a_random_moment_leaves_a_valid_checkpoint(tmp_path):
    """Writers saving in a loop are SIGKILLed at a random moment after their first checkpoint;
    the newest complete one must load without a warning and the next save must clean up."""
    runs = [tmp_path / f"run{i}" for i in range(4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, *map(str, runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    reported = [int(line) for line in done.stdout.split()]
    assert len(reported) == len(runs)
    for run_dir, last in zip(runs, reported, strict=True):
        warnings = []
        checkpoint = load_latest_checkpoint(run_dir, warnings.append)
        assert warnings == []
        assert last <= checkpoint.step <= last + 1
        assert checkpoint.trainer == {"step": checkpoint.step}
        assert torch.equal(checkpoint.model["w"], torch.full((128, 256), float(checkpoint.step)))
        assert checkpoint.model["tied"] is checkpoint.model["w"]
        save_step(run_dir, checkpoint.step + 1, keep_last=2)
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def logged_lines(run_dir: Path) -> int:
    """Complete lines in a run's metrics (a line being written is not counted)."""
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_sigint_at_random_moments_then_resume_matches_uninterrupted(tmp_path, corpus):
    """Ctrl-C at random moments of a Muon run (often inside ``optimizer.step()``): each process
    finishes and saves the step it was in and exits 130; resuming after every interrupt gives
    the losses of an uninterrupted run of the same config bit for bit."""
    from lmlab.cli import main

    settings = [
        *TINY_RUN,
        "model.d_model=64",
        "train.optimizer=muon",
        "train.deterministic=true",
        "train.max_steps=80",
        "train.max_time=0",
        "train.eval_interval=1000",
        "train.checkpoint_interval=1000",  # only the interrupts save before the end
        f"data.path={corpus}",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", "--quiet", *settings, "name=whole"]) == 0
    run_dir, rng, interrupted_at = tmp_path / "part", random.Random(0), []
    start = [sys.executable, "-m", "lmlab", "train", "--quiet", *settings, "name=part"]
    resume = [sys.executable, "-m", "lmlab", "train", "--quiet", "--resume", str(run_dir)]
    for command in [start, resume, resume, resume]:
        done = logged_lines(run_dir)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while logged_lines(run_dir) <= done and process.poll() is None:
            time.sleep(0.002)  # the handler is in place once a step has been logged
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        steps = len(train_losses(run_dir))
        assert load_latest_checkpoint(run_dir).step == steps
        interrupted_at.append(steps)
    assert interrupted_at == sorted(set(interrupted_at)) and interrupted_at[-1] < 80
    subprocess.run(resume, check=True, capture_output=True, timeout=60)
    assert train_losses(run_dir) == train_losses(tmp_path / "whole")


def test_atomic_writes_replace_and_leave_no_temporaries(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"b": math.nan, "a": [math.inf, -math.inf, 1.5], "c": (1, None)})
    text = path.read_text()
    assert json.loads(text, parse_constant=pytest.fail) == {
        "a": ["Infinity", "-Infinity", 1.5],
        "b": "NaN",
        "c": [1, None],
    }
    assert text.index('"a"') < text.index('"b"')
    assert float(json.loads(text)["a"][1]) == -math.inf
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
