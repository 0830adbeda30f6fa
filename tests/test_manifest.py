"""carlos replaces or removes only what it wrote (carlos/manifest.py): a user's files in the workdir,
in carlos's own directories, or given as the input, survive every command, and what is in the way is
refused in one line before anything is written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from carlos.cli import main
from carlos.errors import CarlosError
from carlos.manifest import RECORD, Manifest

from .conftest import make_corpus

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", "model.d_ff=64", "--micro_batch_size", "4"]
TINY += ["--eval_interval", "2", "--ckpt_interval", "2", "--sample_tokens", "4", "--warmup_steps", "1"]


def files(d: Path) -> dict[str, str]:
    """Every file under d (the record of written files aside): its sha256."""
    return {
        p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != RECORD
    }


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    err = capsys.readouterr().err
    return e.value.code, err


def refused(argv: list[str], capsys, expect: str) -> str:
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("carlos: error: "), err
    assert expect in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- the record itself


def test_a_path_is_carlos_only_when_the_record_names_it(tmp_path):
    m = Manifest(tmp_path)
    m.claim(tmp_path / "checkpoints" / "best.pt")  # creates checkpoints/, recorded as carlos's
    assert (tmp_path / "checkpoints").is_dir()
    (tmp_path / "checkpoints" / "best.pt").write_text("x")
    (tmp_path / "checkpoints" / "notes.txt").write_text("mine")
    m.claim(tmp_path / "wandb", kind="tree")
    (tmp_path / "wandb" / "run-1").mkdir(parents=True)
    (tmp_path / "wandb" / "run-1" / "log").write_text("w&b's")
    again = Manifest(tmp_path)  # read back from the file
    assert again.owns(tmp_path / "checkpoints" / "best.pt") and again.owns(tmp_path / "wandb" / "run-1" / "log")
    assert not again.owns(tmp_path / "checkpoints" / "notes.txt")
    assert again.foreign(tmp_path / "checkpoints") == []  # a carlos directory may hold the user's files
    again.remove([tmp_path / "checkpoints", tmp_path / "wandb"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == [RECORD, "checkpoints", "notes.txt"]
    # what was removed is forgotten: a file of that name made later is the user's
    assert not Manifest(tmp_path).owns(tmp_path / "checkpoints" / "best.pt")
    assert not Manifest(tmp_path).owns(tmp_path / "wandb" / "run-1" / "log")


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside", "a/../../b", "", ".\\x", "a/./b"])
def test_entries_that_leave_the_directory_are_ignored(tmp_path, rel):
    (tmp_path / "w").mkdir()
    (tmp_path / "outside").write_text("keep")
    (tmp_path / "w" / RECORD).write_text(json.dumps({"file": "x"}) + "\n" + json.dumps({"file": rel}) + "\n")
    m = Manifest(tmp_path / "w")
    assert m.entries == {"x": "file"}
    m.remove_stale()
    assert (tmp_path / "outside").read_text() == "keep"


def test_a_removal_that_cannot_finish_changes_nothing(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    for name in ("a.txt", "b.txt", "c.txt"):
        m.write(tmp_path / "d" / name, lambda f: f.write(b"x"))
    real = os.rename

    def rename(src, dst):
        if str(src).endswith("c.txt"):
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CarlosError, match=r"Operation not permitted moving .*c\.txt\); nothing was changed"):
        m.remove([tmp_path / "d"])
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".carlos-aside")] == []


def test_a_torn_last_line_and_foreign_lines_are_ignored(tmp_path):
    (tmp_path / RECORD).write_text('{"file": "a"}\n[1, 2]\n{"file": 3}\n{"tree": "w", "x": 1}\n{"file": "b')
    assert Manifest(tmp_path).entries == {"a": "file"}


def test_a_user_file_by_a_name_carlos_writes_is_never_replaced(tmp_path):
    (tmp_path / "last.pt").write_text("the user's")
    with pytest.raises(CarlosError, match="carlos did not write"):
        Manifest(tmp_path).write(tmp_path / "last.pt", lambda f: f.write(b"new"))
    assert (tmp_path / "last.pt").read_text() == "the user's"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    m = Manifest(tmp_path)
    m.write(tmp_path / "a.txt", lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise RuntimeError("unexpected pos") from OSError(28, "No space left on device")

    with pytest.raises(CarlosError, match=r"cannot write .*a\.txt \(No space left on device\); free some space"):
        m.write(tmp_path / "a.txt", broken)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORD, "a.txt"]


def test_temporaries_of_recorded_files_only_are_removed(tmp_path):
    m = Manifest(tmp_path)
    m.claim(tmp_path / "c" / "last.pt")
    for name in (".last.pt.tmp-123", ".notes.tmp-9", ".other.pt.tmp-5"):
        (tmp_path / "c" / name).write_text("x")
    m.remove_stale()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".notes.tmp-9", ".other.pt.tmp-5"]


# ---------------------------------------------------------------- prepare


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A user's project: data/corpus.txt and data/notes.txt, the current directory."""
    (tmp_path / "data").mkdir()
    make_corpus(tmp_path / "data" / "corpus.txt")
    (tmp_path / "data" / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


@pytest.mark.parametrize("workdir", [".", "", "./", "data/.."])
def test_prepare_into_a_directory_holding_the_users_data_is_refused(project, capsys, workdir):
    before = files(project)
    refused(["prepare", "--input", "data/corpus.txt", "--workdir", workdir, "--seq_len", "32"], capsys, "holds")
    assert files(project) == before and not (project / RECORD).exists()


def test_prepare_beside_the_users_files_keeps_them(project, capsys):
    """--workdir data: nothing of the user's is where carlos writes, so it prepares there and keeps them."""
    before = files(project)
    assert run(["prepare", "--input", "data/corpus.txt", "--workdir", "data", "--seq_len", "32"], capsys)[0] == 0
    assert {k: v for k, v in files(project).items() if k in before} == before


@pytest.mark.parametrize(
    "name, content",
    [("splits.json", "{}"), ("tokenizer.json", "{}"), ("rng_state.json", "{}"), ("data/train.npy", "x")],
)
def test_a_user_file_where_prepare_writes_is_refused(project, capsys, name, content):
    (project / "w" / "data").mkdir(parents=True)
    (project / "w" / name).write_text(content)
    before = files(project)
    refused(["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "32"], capsys, "carlos did not")
    assert files(project) == before


def test_prepare_leaves_a_users_file_inside_its_own_directories(project, capsys):
    prep = ["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "32"]
    assert run(prep, capsys)[0] == 0
    (project / "w" / "data" / "mine.txt").write_text("mine")
    assert run([*prep, "--seq_len", "16"], capsys)[0] == 0
    assert (project / "w" / "data" / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["data/train.npy", "splits.json", "metrics.jsonl"])
def test_the_input_is_never_among_what_prepare_replaces(project, capsys, name):
    prep = ["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "32"]
    assert run(prep, capsys)[0] == 0
    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "2"], capsys)[0] == 0
    before = files(project)
    refused(["prepare", "--input", f"w/{name}", "--workdir", "w", "--overwrite"], capsys, "prepare replaces")
    os.link(project / "w" / name, project / "linked.txt")  # the same file under another name
    refused(["prepare", "--input", "linked.txt", "--workdir", "w", "--overwrite"], capsys, "prepare replaces")
    (project / "linked.txt").unlink()
    assert files(project) == before


# ---------------------------------------------------------------- train


@pytest.fixture
def prepared(project, capsys) -> Path:
    assert run(["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "32"], capsys)[0] == 0
    return project / "w"


@pytest.mark.parametrize("name", ["checkpoints", "samples", ".hydra"])
def test_a_users_directory_where_train_writes_is_refused(prepared, capsys, name):
    (prepared / name).mkdir()
    (prepared / name / "mine.txt").write_text("mine")
    before = files(prepared)
    refused(["train", "--workdir", "w", *TINY, "--max_steps", "2"], capsys, "which carlos did not write")
    assert files(prepared) == before


@pytest.mark.parametrize("name", ["checkpoints", "samples", "metrics.jsonl", ".hydra"])
def test_a_users_file_where_train_writes_is_refused(prepared, capsys, name):
    (prepared / name).write_text("mine")
    before = files(prepared)
    refused(["train", "--workdir", "w", *TINY, "--max_steps", "2"], capsys, "carlos did not")
    assert files(prepared) == before


def test_overwrite_removes_only_what_the_run_wrote(prepared, capsys):
    train = ["train", "--workdir", "w", *TINY, "--max_steps", "4"]
    assert run(train, capsys)[0] == 0
    for d in ("checkpoints", "samples", ".hydra"):
        (prepared / d / "mine.txt").write_text("mine")
    assert run([*train, "--max_steps", "2", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in (prepared / "checkpoints").iterdir()) == [
        "best.pt",
        "last.pt",
        "mine.txt",
        "step_000002.pt",
    ]
    assert all((prepared / d / "mine.txt").read_text() == "mine" for d in ("checkpoints", "samples", ".hydra"))
    # prepare --overwrite removes the run, and keeps the user's files (so their directories too)
    assert run(["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--overwrite"], capsys)[0] == 0
    left = sorted(p.relative_to(prepared).as_posix() for p in prepared.rglob("*") if p.is_file())
    assert left == [
        RECORD,
        ".hydra/mine.txt",
        "checkpoints/mine.txt",
        "data/test.npy",
        "data/train.npy",
        "data/val.npy",
        "rng_state.json",
        "samples/mine.txt",
        "splits.json",
        "tokenizer.json",
    ]


def test_a_workdir_copied_without_its_record_is_refused_not_deleted(prepared, capsys):
    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "2"], capsys)[0] == 0
    shutil.copytree(prepared, prepared.parent / "copy", ignore=shutil.ignore_patterns(RECORD))
    before = files(prepared.parent / "copy")
    refused(["train", "--workdir", "copy", *TINY, "--max_steps", "2", "--overwrite"], capsys, "carlos did not write")
    refused(["prepare", "--input", "data/corpus.txt", "--workdir", "copy", "--overwrite"], capsys, "carlos did not")
    assert files(prepared.parent / "copy") == before


# ---------------------------------------------------------------- removal is all or nothing


def refuse_renames_of(monkeypatch, name: str) -> None:
    """os.rename of a file named name fails, as it does in a directory marked immutable (chattr +i)."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(src).name == name:
            raise PermissionError(1, "Operation not permitted", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("name", ["step_000004.pt", "config.yaml", "step_000002.txt", "metrics.jsonl", "val.npy"])
@pytest.mark.parametrize("command", ["prepare", "train"])
def test_an_overwrite_that_cannot_remove_a_file_changes_nothing(prepared, capsys, monkeypatch, name, command):
    assert run(["train", "--workdir", "w", *TINY, "--max_steps", "4"], capsys)[0] == 0
    before = files(prepared)
    refuse_renames_of(monkeypatch, name)
    argv = {
        "prepare": ["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "16", "--overwrite"],
        "train": ["train", "--workdir", "w", *TINY, "--max_steps", "2", "--overwrite"],
    }[command]
    if command == "train" and name == "val.npy":
        return  # train never removes prepared data
    refused(argv, capsys, "nothing was changed")
    assert files(prepared) == before
    assert not [p for p in prepared.iterdir() if p.name.startswith((".carlos-aside", ".prepare-"))]


def test_a_failed_prepare_removes_only_what_it_made(project, capsys, monkeypatch):
    """prepare into new/a fails after another command put its work into new/ meanwhile: new/a goes, the
    rest stays (the failing prepare made new/ too, but it is not empty any more)."""
    import carlos.prepare

    real_pack = carlos.prepare.pack

    def pack(tokens, n, seq_len, dtype, out, *args, **kwargs):
        if out.name == "val.npy":
            (project / "new" / "b").mkdir()
            (project / "new" / "b" / "work.txt").write_text("another command's work\n")
            (project / "new" / "README").write_text("notes\n")
            raise OSError(28, "No space left on device")
        return real_pack(tokens, n, seq_len, dtype, out, *args, **kwargs)

    monkeypatch.setattr(carlos.prepare, "pack", pack)
    refused(["prepare", "--input", "data/corpus.txt", "--workdir", "new/a", "--seq_len", "32"], capsys, "No space")
    assert sorted(p.relative_to(project / "new").as_posix() for p in (project / "new").rglob("*")) == [
        "README",
        "b",
        "b/work.txt",
    ]


@pytest.mark.slow
def test_prepare_overwrite_removes_sweeps_but_not_the_users_files_in_them(prepared, capsys):
    sweep = ["train", "--workdir", "w", "-m", *TINY, "--max_steps", "2", "seed=1,2"]
    assert run([*sweep, "hydra.sweep.dir=w/sweeps/lr/exp1"], capsys)[0] == 0  # one level deeper than usual
    assert run(sweep, capsys)[0] == 0
    stamped = next(p for p in (prepared / "sweeps").iterdir() if p.name != "lr")
    (stamped / "my_analysis.md").write_text("mine\n")
    (stamped / "0" / "checkpoints" / "notes.txt").write_text("mine\n")
    prep = ["prepare", "--input", "data/corpus.txt", "--workdir", "w", "--seq_len", "32"]
    refused(prep, capsys, "already holds a trained run")
    assert run([*prep, "--overwrite"], capsys)[0] == 0
    left = sorted(p.relative_to(prepared / "sweeps").as_posix() for p in (prepared / "sweeps").rglob("*"))
    name = stamped.name
    assert left == [
        name,
        f"{name}/0",
        f"{name}/0/checkpoints",
        f"{name}/0/checkpoints/notes.txt",
        f"{name}/my_analysis.md",
    ]


@pytest.mark.slow
def test_a_refused_sweep_job_keeps_the_results_of_the_earlier_sweep_in_its_directory(prepared, capsys):
    sweep = ["train", "--workdir", "w", "-m", *TINY, "--max_steps", "2", "seed=1", "hydra.sweep.dir=w/sweeps/fixed"]
    assert run(sweep, capsys)[0] == 0
    job = prepared / "sweeps" / "fixed" / "0"
    earlier = (job / "job.json").read_text()
    code, err = run(sweep, capsys)  # the same directory again, without resume: refused
    assert code == 1 and "already holds checkpoints of an earlier run" in err
    assert (job / "job.json").read_text() == earlier and '"status": "ok"' in earlier
    assert not (job / "error.log").exists()
