"""Corpora of many files: several paths, a directory (recursive, --glob) or a glob pattern, read as one
corpus in sorted path order with each file one document; a single file is prepared exactly as before."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from carlos.corpus import Corpus, Listing, input_files
from carlos.errors import CarlosError

from .conftest import run_cli

A = "The first file.\n\nIts second paragraph.\n"
B = "The second file: naïve café, 東京.\n" * 40
C = "A third, in a subdirectory.\n" * 40


def run(argv: list[str], capsys) -> tuple[int, str]:
    code, _, err = run_cli(argv, capsys)
    return code, err


@pytest.fixture
def texts(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text(B, encoding="utf-8")
    (root / "a.txt").write_text(A, encoding="utf-8")
    (root / "sub" / "c.txt").write_text(C, encoding="utf-8")
    (root / "notes.md").write_text("# not a .txt\n" * 50, encoding="utf-8")
    (root / ".git" / "hidden.txt").write_text("hidden\n", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


def tokens(workdir: Path) -> list[int]:
    """Every token of the three splits in order, the overlap of each packed tail window dropped."""
    info = json.loads((workdir / "splits.json").read_text())
    out = []
    for split in ("train", "val", "test"):
        windows, n, length = np.load(workdir / "data" / f"{split}.npy"), info["tokens"][split], info["seq_len"]
        flat = np.concatenate([windows[:-1, :length].reshape(-1), windows[-1]]) if len(windows) > 1 else windows[0]
        keep = n - (len(windows) - 1) * length if len(windows) > 1 else n
        out += np.concatenate([flat[: (len(windows) - 1) * length], windows[-1][-keep:]]).tolist()
    return out


def test_a_directory_is_read_recursively_in_sorted_order_each_file_one_document(texts, capsys):
    argv = ["prepare", "--input", "texts", "--workdir", "w", "--seq_len", "16", "--add_bos", "--add_eos"]
    assert run(argv, capsys)[0] == 0
    info = json.loads(Path("w/splits.json").read_text())
    order = [A, B, C]  # texts/a.txt, texts/b.txt, texts/sub/c.txt: the .md, the hidden and the empty file left out
    assert [Path(f["path"]).name for f in info["files"]] == ["a.txt", "b.txt", "c.txt"]
    assert [f["bytes"] for f in info["files"]] == [len(t.encode()) for t in order]
    assert [f["sha256"] for f in info["files"]] == [hashlib.sha256(t.encode()).hexdigest() for t in order]
    joined = "\n\n".join(order).encode()
    assert info["size"] == len(joined) and info["sha256"] == hashlib.sha256(joined).hexdigest()
    assert info["input"] == "texts"
    # each file one document: BOS and EOS once per file, the blank line inside a.txt is text
    expected = []
    for i, text in enumerate(order):
        expected += ([10, 10] if i else []) + [256, *text.encode(), 257]
    got = tokens(Path("w"))
    assert got.count(256) == 3 + 2  # one per file, and one where val and test begin mid-document
    assert [t for t in got if t < 256] == [t for t in expected if t < 256]


def test_several_paths_a_glob_and_one_joined_file_give_the_same_data(texts, capsys):
    (texts / "joined.txt").write_text("\n\n".join([A, B]), encoding="utf-8")
    common = ["--seq_len", "16"]
    assert run(["prepare", "--input", "texts/a.txt", "texts/b.txt", "--workdir", "several", *common], capsys)[0] == 0
    assert run(["prepare", "--input", "texts/[ab].txt", "--workdir", "globbed", *common], capsys)[0] == 0
    assert run(["prepare", "--input", "texts/joined.txt", "--workdir", "one", *common], capsys)[0] == 0
    for split in ("train", "val", "test"):
        data = [np.load(Path(w) / "data" / f"{split}.npy") for w in ("several", "globbed", "one")]
        assert np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])
    several, one = (json.loads((Path(w) / "splits.json").read_text()) for w in ("several", "one"))
    assert several["sha256"] == one["sha256"] and several["splits"] == one["splits"]
    assert "files" not in one and one["input"] == str((texts / "joined.txt").resolve())  # one file: as before
    assert (
        run(["prepare", "input=[texts/b.txt,texts/a.txt,texts/a.txt]", "--workdir", "listed", *common], capsys)[0] == 0
    )
    assert json.loads(Path("listed/splits.json").read_text())["sha256"] == one["sha256"]  # sorted, each once


def test_glob_chooses_the_files_of_a_directory(texts, capsys):
    assert run(["prepare", "--input", "texts", "--glob", "*.md", "--workdir", "md", "--seq_len", "16"], capsys)[0] == 0
    info = json.loads(Path("md/splits.json").read_text())
    assert [Path(f["path"]).name for f in info["files"]] == ["notes.md"]


def test_a_file_that_is_not_utf8_is_named_with_its_path_and_offset(texts, capsys):
    (texts / "sub" / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    code, err = run(["prepare", "--input", "texts", "--workdir", "w", "--seq_len", "16"], capsys)
    assert code == 2
    assert err.strip() == (
        f"carlos: error: input {Path('texts/sub/latin1.txt')} is not UTF-8: first bad byte 0xe9 at offset 3; "
        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )
    assert not Path("w").exists()


def test_inputs_that_match_nothing_are_refused(texts, capsys):
    code, err = run(["prepare", "--input", "texts", "--glob", "*.rst", "--workdir", "w"], capsys)
    assert code == 2 and "input texts holds no file matching '*.rst'; pass --glob PATTERN" in err
    code, err = run(["prepare", "--input", "nowhere/*.txt", "--workdir", "w"], capsys)
    assert code == 2 and "input nowhere/*.txt matches no file" in err
    code, err = run(["prepare", "--input", "texts/a.txt", "texts/missing.txt", "--workdir", "w"], capsys)
    assert code == 2 and "missing.txt does not exist" in err
    assert not Path("w").exists()


def test_prepare_says_how_many_files_it_read_and_what_it_left_out_and_why(texts, capsys):
    (texts / ".draft.txt").write_text("hidden\n", encoding="utf-8")
    if sys.platform != "win32":
        (texts / "again.txt").symlink_to("a.txt")
    prepare = ["prepare", "--input", "texts", "texts/*.txt", "--workdir", "texts/w", "--seq_len", "16"]
    assert run_cli(prepare, capsys)[0] == 0
    code, out, _ = run_cli([*prepare, "--overwrite"], capsys)  # now with the workdir inside the input
    size = sum(len(t.encode()) for t in (A, B, C))
    assert code == 0 and out.startswith(f"read 3 files, {size:,} bytes; left out: ")
    left_out = out.splitlines()[0].split("; left out: ")[1]
    assert f"2 hidden ({Path('texts/.draft.txt')}, {Path('texts/.git')}{os.sep} (not searched))" in left_out
    assert f"1 inside the workdir ({Path('texts/w')}{os.sep} (not searched))" in left_out
    assert f"1 empty ({Path('texts/empty.txt')})" in left_out
    if sys.platform != "win32":  # a.txt given twice by the same name is read once and not named
        assert f"1 duplicate ({Path('texts/again.txt')} (the same file as {Path('texts/a.txt')}))" in left_out
    assert run_cli(["prepare", "--input", "texts/b.txt", "--workdir", "w1", "--seq_len", "8"], capsys)[1].startswith(
        "prepared w1:"
    )  # one file: as it always was


def test_the_left_out_files_are_counted_in_words():
    from carlos.prepare import files_read

    one = files_read([{"bytes": 5}], {"duplicate": ["b (the same file as a)"], "empty": []})
    assert one == "read 1 file, 5 bytes; left out: 1 duplicate (b (the same file as a))"
    many = files_read([{"bytes": 5}] * 2, {"duplicate": ["b", "c"], "hidden": [".1", ".2", ".3", ".4", ".5"]})
    assert many == "read 2 files, 10 bytes; left out: 2 duplicates (b, c); 5 hidden (.1, .2, .3 and 2 more)"


def test_the_workdir_inside_the_input_directory_is_not_read(texts, capsys):
    assert run(["prepare", "--input", "texts", "--workdir", "texts/w", "--seq_len", "16"], capsys)[0] == 0
    assert run(["train", "--workdir", "texts/w", "--max_steps", "2", "--sample_tokens", "4"], capsys)[0] == 0
    assert (
        run(["prepare", "--input", "texts", "--workdir", "texts/w", "--seq_len", "16", "--overwrite"], capsys)[0] == 0
    )
    info = json.loads(Path("texts/w/splits.json").read_text())
    assert [Path(f["path"]).name for f in info["files"]] == ["a.txt", "b.txt", "c.txt"]  # not its samples/*.txt


def test_a_file_that_changes_after_it_was_listed_is_refused(texts):
    sources = Corpus([texts / "a.txt", texts / "b.txt"], "\n\n", "texts")
    (texts / "b.txt").write_text(B + "more\n", encoding="utf-8")
    with pytest.raises(CarlosError, match=r"b.txt changed while it was read"):
        sources.scan()


def test_segments_cover_the_joined_text_exactly(texts):
    sources = Corpus([texts / "a.txt", texts / "b.txt", texts / "sub" / "c.txt"], "<|>", "texts")
    joined = "<|>".join([A, B, C]).encode()
    assert sources.size == len(joined)
    for start, n in [(0, len(joined)), (len(A.encode()) - 2, 7), (5, 1), (len(joined) - 4, 4)]:
        assert sources.read_at(start, n) == joined[start : start + n]


# ---------------------------------------------------------------- directories that cannot be listed, links

LEFT_OUT = "so its files would be left out; make it readable, or name the files to read instead"


@pytest.fixture
def lock(monkeypatch):
    """lock(directory): the directory cannot be listed (mode 0). As root, where the mode stops nothing,
    os.scandir refuses it the way the kernel refuses other users. The modes are given back afterwards."""
    locked: list[Path] = []
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path).resolve() in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path)

    def lock(directory: Path) -> None:
        directory.chmod(0)
        locked.append(directory.resolve())
        if os.access(directory, os.R_OK):
            monkeypatch.setattr(os, "scandir", scandir)

    yield lock
    for d in locked:
        d.chmod(0o755)


def test_a_subdirectory_that_cannot_be_listed_is_refused_not_left_out(texts, lock, capsys):
    (texts / "more").mkdir()
    (texts / "more" / "d.txt").write_text(C, encoding="utf-8")
    lock(texts / "more")
    for spec in ("texts", "texts/**/*.txt"):  # a directory, and a glob that searches it
        code, err = run(["prepare", "--input", spec, "--workdir", "w", "--seq_len", "16"], capsys)
        assert (code, err.count("\n")) == (2, 1), err
        assert err.startswith(f"carlos: error: input {Path('texts/more')} cannot be listed (Permission denied), ")
        assert LEFT_OUT in err and not Path("w").exists()
    # a glob that does not need it reads what it names
    assert input_files("texts/*.txt", "*.txt", Listing(Path("w"))) == [
        Path("texts", n) for n in ("a.txt", "b.txt", "empty.txt")
    ]


def test_linked_directories_are_read_each_once_and_links_that_lead_nowhere_are_named(texts, lock, capsys):
    (texts.parent / "more").mkdir()
    (texts.parent / "more" / "d.txt").write_text(C, encoding="utf-8")
    (texts / "more").symlink_to("../more")  # a directory linked in: read
    (texts / "sub" / "up").symlink_to("..")  # a link back up the tree: every file still once
    assert run(["prepare", "--input", "texts", "--workdir", "w", "--seq_len", "16"], capsys)[0] == 0
    files = [f["path"] for f in json.loads(Path("w/splits.json").read_text())["files"]]
    assert files == [str(texts.parent / n) for n in ("texts/a.txt", "texts/b.txt", "more/d.txt", "texts/sub/c.txt")]
    assert input_files("texts/**/*.txt", "*.txt", Listing(Path("w"))) == input_files(
        "texts", "*.txt", Listing(Path("w"))
    )

    (texts.parent / "locked").mkdir()
    (texts / "locked").symlink_to("../locked")  # a link to a directory that cannot be listed
    lock(texts.parent / "locked")
    with pytest.raises(CarlosError, match=rf"^input {re.escape(str(Path('texts/locked')))} cannot be listed"):
        input_files("texts", "*.txt", Listing(Path("w")))
    (texts / "locked").unlink()
    (texts / "sub" / "loop").symlink_to("loop")  # a link that leads to itself: a directory or not, no one can say
    for spec in ("texts", "texts/**/*.txt"):
        with pytest.raises(CarlosError) as refused:
            input_files(spec, "*.txt", Listing(Path("w")))
        assert str(refused.value).startswith(
            f"input {Path('texts/sub/loop')} is a symlink loop (a link that leads back to itself); fix or remove it"
        )


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
def test_a_subdirectory_the_user_cannot_list_is_refused_by_the_kernel(tmp_path):
    """No stand-in: the kernel refuses the listing. Run as root, prepare runs without the capabilities that
    let root read anything (setpriv drops them), so the permission bits hold for it too."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("root, and setpriv cannot drop the capabilities that bypass permissions")
    (tmp_path / "texts" / "locked").mkdir(parents=True)
    (tmp_path / "texts" / "a.txt").write_text(B, encoding="utf-8")
    (tmp_path / "texts" / "locked" / "b.txt").write_text(B, encoding="utf-8")
    (tmp_path / "texts" / "locked").chmod(0)
    try:
        argv = [sys.executable, "-m", "carlos", "prepare", "--input", "texts", "--workdir", "w", "--seq_len", "16"]
        p = subprocess.run([*prefix, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "texts" / "locked").chmod(0o755)
    assert p.returncode == 2, p.stderr
    assert p.stderr == (
        f"carlos: error: input {Path('texts/locked')} cannot be listed (Permission denied), {LEFT_OUT} (several "
        "paths, or a glob that leaves it out)\n"
    )
    assert not (tmp_path / "w").exists()
