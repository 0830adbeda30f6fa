"""kill -9 costs nothing already written: at random moments of a run, in the middle of a checkpoint write,
and in the middle of prepare. Every checkpoint left is its old or its new version and loads; --resume
continues; a half-prepared workdir is never accepted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint
from carlos.cli import main
from carlos.workdir import PreparedData

from .conftest import make_corpus

CARLOS = str(Path(sys.executable).parent / "carlos")
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
RUN = [*TINY, "--eval_interval", "10", "--log_interval", "1", "--sample_tokens", "8", "--warmup_steps", "2"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "CARLOS_DEBUG"))}
    return {**env, "WANDB_MODE": "disabled"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=_env(), timeout=300)


def _patched(cwd: Path, patch: str, argv: list[str]) -> subprocess.CompletedProcess:
    """carlos with `patch` applied first: the way to kill it at an exact point of its work."""
    code = f"import os, signal, sys\nimport torch\nfrom carlos.cli import main\n{patch}\nmain({argv!r})\n"
    return _run([sys.executable, "-c", code], cwd)


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    make_corpus(tmp_path / "corpus.txt")
    p = _run([CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], tmp_path)
    assert p.returncode == 0, p.stderr
    return tmp_path


def _checkpoints_intact(ckpts: Path) -> dict[str, int]:
    """Every checkpoint loads with weights_only and holds finite weights; {name: step}. Temporary files
    (.name.tmp-PID) of an interrupted write may remain; they are never read."""
    steps = {}
    for p in sorted(ckpts.glob("*.pt")):
        ckpt = load_checkpoint(p)
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values()), p.name
        steps[p.name] = ckpt["carlos"]["step"]
        if p.name.startswith("step_"):
            assert steps[p.name] == int(p.stem.split("_")[1])
    # last.pt is a copy of a step file: the newest, or the one before when the copy was interrupted
    assert steps["last.pt"] in {s for n, s in steps.items() if n.startswith("step_")}
    return steps


def _metric_steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_kill_9_at_random_moments_then_resume(prepared: Path) -> None:
    """A checkpoint every step, so a good share of the kills land inside a write."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    ckpts = prepared / "w" / "checkpoints"
    args = [CARLOS, "train", "--workdir", "w", *RUN, "--max_steps", "400", "--ckpt_interval", "1"]
    steps_seen = []
    for attempt in range(3):
        p = subprocess.Popen(
            [*args, *(["--resume"] if attempt else [])],
            cwd=prepared,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        deadline = time.time() + 120
        start = steps_seen[-1] if steps_seen else 0
        while time.time() < deadline and p.poll() is None:  # wait for this session's first checkpoint
            last = ckpts / "last.pt"
            if last.exists() and len(list(ckpts.glob("step_*.pt"))) > start:
                break
            time.sleep(0.01)
        assert p.poll() is None, f"the run ended before the kill: {p.stderr.read()}"
        time.sleep(rng.uniform(0.0, 0.5))
        p.kill()
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL
        steps = _checkpoints_intact(ckpts)
        assert steps["last.pt"] >= (steps_seen[-1] if steps_seen else 1), f"seed {seed}"
        steps_seen.append(steps["last.pt"])
    assert steps_seen[-1] < 400, f"the runs were not interrupted (seed {seed})"

    p = _run([*args, "--resume"], prepared)
    assert p.returncode == 0, p.stderr
    assert f"at step {steps_seen[-1]}" in p.stdout
    steps = _checkpoints_intact(ckpts)
    assert steps["last.pt"] == 400 and len([n for n in steps if n.startswith("step_")]) == 400
    assert not list(ckpts.glob(".*")), "the resumed run removes the temporary files of interrupted writes"
    logged = _metric_steps(prepared / "w")
    assert logged == sorted(logged) and logged[-1] == 400  # no step repeats, none cut short


# the n-th torch.save of the run writes part of its file, then the process dies (kill -9)
DIE_IN_SAVE = """
real_save, seen = torch.save, [0]
def save(obj, f, *args, **kwargs):
    seen[0] += 1
    if seen[0] == {n}:
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""
# the process dies after writing the new last.pt in full, just before renaming it into place
DIE_BEFORE_RENAME = """
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("last.pt"):
        seen[0] += 1
        if seen[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.parametrize(
    "patch, left",
    [
        # step 2: step_000002.pt (save 1), last.pt; step 4: step_000004.pt is save 2 -> killed mid-write
        (DIE_IN_SAVE.format(n=2), {"last.pt": 2, "step_000002.pt": 2}),
        # step 4: step_000004.pt written, the copy to last.pt killed before its rename: last.pt is still step 2
        (DIE_BEFORE_RENAME, {"last.pt": 2, "step_000002.pt": 2, "step_000004.pt": 4}),
    ],
    ids=["inside-torch-save", "before-last-rename"],
)
def test_kill_9_inside_a_checkpoint_write(prepared: Path, patch: str, left: dict) -> None:
    argv = ["train", "--workdir", "w", *RUN, "--max_steps", "6", "--ckpt_interval", "2"]
    p = _patched(prepared, patch, argv)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ckpts = prepared / "w" / "checkpoints"
    assert list(ckpts.glob(".*.tmp-*")), "the write was interrupted halfway"
    assert _checkpoints_intact(ckpts) == left
    p = _run([CARLOS, *argv, "--resume"], prepared)
    assert p.returncode == 0, p.stderr
    assert "resuming from w/checkpoints/last.pt at step 2" in p.stdout
    after = {"best.pt": 6, "last.pt": 6, "step_000002.pt": 2, "step_000004.pt": 4, "step_000006.pt": 6}
    assert _checkpoints_intact(ckpts) == after
    assert not list(ckpts.glob(".*"))


# prepare dies while packing the val split, or just before splits.json is moved into place
DIE_IN_PACK = """
import carlos.prepare
real_pack = carlos.prepare.pack
def pack(tokens, n, seq_len, dtype, out, *args, **kwargs):
    if out.name == "val.npy":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_pack(tokens, n, seq_len, dtype, out, *args, **kwargs)
carlos.prepare.pack = pack
"""
DIE_BEFORE_SPLITS = """
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if str(dst).endswith("splits.json"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.parametrize("patch", [DIE_IN_PACK, DIE_BEFORE_SPLITS], ids=["while-packing", "before-splits-json"])
@pytest.mark.parametrize("again", [False, True], ids=["new-workdir", "prepared-again"])
def test_prepare_killed_midway_leaves_nothing_train_accepts(
    tmp_path: Path, patch: str, again: bool, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    make_corpus(tmp_path / "corpus.txt")
    make_corpus(tmp_path / "other.txt", seed=1)
    prep = ["prepare", "--workdir", "w", "--seq_len", "32"]
    if again:  # a workdir prepared before, prepared again from another corpus
        assert _run([CARLOS, *prep, "--input", "corpus.txt"], tmp_path).returncode == 0
    p = _patched(tmp_path, patch, [*prep, "--input", "other.txt", "--overwrite"])
    assert p.returncode == -signal.SIGKILL, p.stderr
    splits = tmp_path / "w" / "splits.json"
    if splits.exists():  # killed before it touched the old data: the old preparation, whole
        assert again and patch == DIE_IN_PACK
        assert json.loads(splits.read_text())["input"].endswith("corpus.txt")
        PreparedData.load(tmp_path / "w")  # every split there with the shape splits.json gives
    else:  # anything later: refused until prepare runs again
        for command in (["train"], ["eval", "--checkpoint", "x.pt"]):
            monkeypatch.chdir(tmp_path)
            with pytest.raises(SystemExit) as refused:
                main([*command, "--workdir", "w"])
            err = capsys.readouterr().err
            assert refused.value.code == 2 and "workdir w is not prepared" in err, err
    p = _run([CARLOS, *prep, "--input", "other.txt", "--overwrite"], tmp_path)
    assert p.returncode == 0, p.stderr
    left = sorted(x.name for x in (tmp_path / "w").iterdir())
    assert left == [".carlos-files", "data", "rng_state.json", "splits.json", "tokenizer.json"]  # no temporaries
    assert json.loads(splits.read_text())["input"].endswith("other.txt")
