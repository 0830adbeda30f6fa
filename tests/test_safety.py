"""Hostile checkpoints are refused without running their code; secrets from the environment or .env never
reach a run's outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint
from carlos.errors import CarlosError

from .conftest import make_corpus, record_as_carlos

CARLOS = str(Path(sys.executable).parent / "carlos")


class Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "carlos": {"step": 1}, "x": Payload(marker)}, path)
    return path


def _prepare(tmp_path: Path, env: dict) -> None:
    make_corpus(tmp_path / "corpus.txt")
    p = subprocess.run(
        [CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "W", "--seq_len", "32"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr


def test_a_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CarlosError, match="refused by the safe loader"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.slow
def test_hostile_checkpoint_through_eval_sample_and_resume(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB")}, "WANDB_MODE": "disabled"}
    _prepare(tmp_path, env)
    marker = tmp_path / "pwned"
    (tmp_path / "W" / "checkpoints").mkdir()
    _evil_checkpoint(tmp_path / "W" / "checkpoints" / "last.pt", marker)
    # as if carlos had written it (a file carlos did not write is refused before anything loads it)
    record_as_carlos(tmp_path / "W", tmp_path / "W" / "checkpoints", tmp_path / "W" / "checkpoints" / "last.pt")
    for args in (
        ["eval", "--workdir", "W", "--checkpoint", "last"],
        ["sample", "--workdir", "W", "--checkpoint", "last"],
        ["train", "--workdir", "W", "--resume", "--max_steps", "4"],
    ):
        p = subprocess.run([CARLOS, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and "refused by the safe loader" in p.stderr
        assert not marker.exists()


SECRETS = {
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_secretTOKENvalue987654321",
    "MY_SERVICE_PASSWORD": "hunter2-secret-password",
}


@pytest.mark.slow
def test_secrets_never_reach_the_outputs_of_a_run(tmp_path):
    """A run with W&B offline, keys in the environment and in .env: no file the run writes holds them."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env.update(WANDB_API_KEY=SECRETS["WANDB_API_KEY"], WANDB_MODE="offline", WANDB_SILENT="true")
    (tmp_path / ".env").write_text(
        f"WANDB_PROJECT=carlos-test\nHF_TOKEN={SECRETS['HF_TOKEN']}\n"
        f"MY_SERVICE_PASSWORD={SECRETS['MY_SERVICE_PASSWORD']}\n"
    )
    _prepare(tmp_path, env)
    p = subprocess.run(
        [CARLOS, "train", "--workdir", "W", "--max_steps", "6", "--eval_interval", "3", "--sample_tokens", "8"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "W" / "wandb").is_dir()  # W&B did run, offline, inside the run directory
    for text in (p.stdout, p.stderr):
        for secret in SECRETS.values():
            assert secret not in text
    for path in (tmp_path / "W").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in data, f"{name} found in {path}"


def test_dotenv_is_ignored_by_git():
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_nothing_in_carlos_unpickles_unguarded():
    """Every torch.load passes weights_only=True, and Lightning's resume too; nothing else unpickles."""
    import re

    root = Path(__file__).resolve().parents[1]
    sources = {p: p.read_text(encoding="utf-8") for p in [*root.glob("carlos/*.py"), *root.glob("scripts/*.py")]}
    loads, fits = 0, 0
    for path, text in sources.items():
        for call in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            loads += 1
            assert "weights_only=True" in call.group(0), f"{path.name}: {call.group(0)}"
        for call in re.finditer(r"\.fit\(([^()]|\([^()]*\))*\)", text):
            if "ckpt_path" in call.group(0):
                fits += 1
                assert "weights_only=True" in call.group(0), f"{path.name}: {call.group(0)}"
        # np.load refuses pickled arrays unless allow_pickle=True is passed
        for banned in ("pickle.load", "pickle.Unpickler", "allow_pickle=True", "dill", "joblib.load"):
            assert banned not in text, f"{path.name} uses {banned}"
    assert loads == 1 and fits == 1  # checkpoint.load_checkpoint and train's resume
