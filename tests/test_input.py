"""prepare's input never hangs it and is never read half old, half new: what is not a regular file is
refused up front, a file that changes while it is read is refused in one line with nothing left behind,
a corpus without newlines still splits, and a signal during prepare cleans up and says one line."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import carlos.prepare
from carlos.cli import main
from carlos.workdir import PreparedData

from .conftest import make_corpus

CARLOS = str(Path(sys.executable).parent / "carlos")
posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX files and signals")


def refused(argv: list[str], capsys, expect: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("carlos: error: "), lines
    assert expect in lines[0], lines[0]
    return lines[0]


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_corpus(tmp_path / "corpus.txt", n_lines=3000)
    return tmp_path


# ---------------------------------------------------------------- not a regular file


@posix
def test_inputs_that_are_not_regular_files_are_refused_without_blocking(here):
    """Each in a fresh process with a timeout: a FIFO opened for reading would block it forever."""
    os.mkfifo(here / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(here / "sock"))
    os.symlink("loop", here / "loop")
    os.symlink("nowhere.txt", here / "dangling")
    (here / "file").write_text("x")
    (here / "no_text").mkdir()
    cases = {
        "fifo": "is a FIFO (named pipe); save the text to a file",
        "sock": "is a socket",
        "/dev/zero": "is a character device",
        "/dev/null": "is a character device",
        "loop": "is a symlink loop",
        "dangling": "is a symlink to nowhere.txt, which does not exist",
        "file/inside.txt": "a part of that path is a file",
        "no_text": "holds no file matching '*.txt'",  # a directory is read for its text files
    }
    try:
        for path, expect in cases.items():
            p = subprocess.run(
                [CARLOS, "prepare", "--input", path, "--workdir", "w"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert p.returncode == 2 and p.stderr.count("\n") == 1 and expect in p.stderr, (path, p.stderr)
            assert not (here / "w").exists()
    finally:
        server.close()


# ---------------------------------------------------------------- a file that changes while it is read


def change_during(mp: pytest.MonkeyPatch, at: str, change) -> None:
    """change(path) runs once, when prepare reaches `at`: the packing of val.npy, or the tokenizing of
    the val split (after the first pass hashed the whole file)."""
    done = []
    name = "pack" if at == "pack" else "tokenize_split"
    real = getattr(carlos.prepare, name)

    def hooked(*args, **kwargs):
        val = str(args[4]).endswith("val.npy") if name == "pack" else args[1] > 0
        if val and not done:
            done.append(True)
            change(Path("corpus.txt"))
        return real(*args, **kwargs)

    mp.setattr(carlos.prepare, name, hooked)


def shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def to_empty(path: Path) -> None:
    os.truncate(path, 0)


def grow(path: Path) -> None:
    with open(path, "a") as f:
        f.write("one more line\n" * 100)


def rewrite_in_place(path: Path) -> None:
    """Other bytes where prepare has not read yet (the test split), the same size and modification time:
    only the hash of what was read can tell."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size - 10)
        f.write(b"XYZ")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def replace_by_rename(path: Path) -> None:
    """A new file renamed over the path: prepare goes on reading the file it opened, and finishes."""
    tmp = path.with_suffix(".new")
    tmp.write_text("something else entirely\n" * 10)
    os.replace(tmp, path)


@pytest.mark.parametrize("change", [shrink, to_empty, grow, rewrite_in_place])
@pytest.mark.parametrize("at", ["tokenize", "pack"])
@pytest.mark.parametrize("again", [False, True], ids=["new-workdir", "prepared-before"])
def test_an_input_that_changes_while_read_is_refused(here, capsys, monkeypatch, change, at, again):
    prep = ["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"]
    if again:
        main(prep)
        old = (here / "w" / "splits.json").read_bytes()
    capsys.readouterr()
    change_during(monkeypatch, at, change)
    refused([*prep, "--overwrite"], capsys, "input corpus.txt changed while it was read")
    if again:  # the previous preparation, whole
        assert (here / "w" / "splits.json").read_bytes() == old
        PreparedData.load(here / "w")
        assert not [n for n in leftovers(here / "w") if n.startswith(".prepare-")]
    else:
        assert not (here / "w").exists()


def test_an_input_replaced_by_rename_is_read_as_it_was_opened(here, capsys, monkeypatch):
    before = (here / "corpus.txt").read_bytes()
    change_during(monkeypatch, "pack", replace_by_rename)
    main(["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"])
    data = PreparedData.load(here / "w")
    assert sum(s["bytes"] for s in data.info["splits"].values()) == len(before)


@pytest.mark.slow
@posix
def test_truncating_the_input_at_random_moments_never_hangs_prepare(here):
    """A real writer, another process: whatever the moment, prepare prepares or refuses in one line."""
    rng = random.Random(0)
    body = (here / "corpus.txt").read_bytes() * 400  # ~12 MB
    for attempt in range(6):
        (here / "big.txt").write_bytes(body)
        p = subprocess.Popen(
            [CARLOS, "prepare", "--input", "big.txt", "--workdir", f"w{attempt}"],
            cwd=here,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(1.0, 3.0))
        os.truncate(here / "big.txt", rng.randrange(len(body)))
        out, err = p.communicate(timeout=120)
        assert p.returncode in (0, 2), err
        if p.returncode == 2:
            assert err.count("\n") == 1 and err.startswith("carlos: error: "), err
            assert not (here / f"w{attempt}").exists()
        else:
            PreparedData.load(here / f"w{attempt}")


# ---------------------------------------------------------------- where the splits are cut


@pytest.mark.parametrize(
    "text",
    [
        "word " * 20_000,  # one long line, no newline
        "line\r" * 20_000,  # CR-only line ends
        "a\x00b " * 20_000,  # NUL bytes
        "é日本" * 10_000,  # multi-byte characters only, no ASCII to cut before
        "x" * 100 + "\n" + "y" * 100_000,  # one newline, far from the cuts
    ],
    ids=["one-line", "cr-only", "nul", "multibyte", "far-newline"],
)
def test_a_corpus_without_newlines_near_the_cuts_still_splits(here, capsys, text):
    (here / "odd.txt").write_text(text, encoding="utf-8")
    main(["prepare", "--input", "odd.txt", "--workdir", "w", "--seq_len", "32"])
    data = PreparedData.load(here / "w")
    splits = data.info["splits"]
    raw = text.encode("utf-8")
    assert [splits[s]["bytes"] for s in ("train", "val", "test")] == [
        pytest.approx(len(raw) * f, rel=0.3) for f in (0.9, 0.05, 0.05)
    ]
    pieces = [raw[splits[s]["start"] : splits[s]["end"]] for s in ("train", "val", "test")]
    assert b"".join(pieces) == raw and all(p.decode("utf-8") for p in pieces)  # cut between characters


# ---------------------------------------------------------------- signals during prepare

SLOW_PACK = """
import time
import carlos.prepare
real_pack = carlos.prepare.pack
def pack(tokens, n, seq_len, dtype, out, *args, **kwargs):
    if out.name == "val.npy":
        print("PACKING", flush=True)
        time.sleep(60)
    return real_pack(tokens, n, seq_len, dtype, out, *args, **kwargs)
carlos.prepare.pack = pack
"""
SLOW_SCAN = """
import time
import carlos.corpus
real_scan = carlos.corpus.scan
def scan(*args, **kwargs):
    print("SCANNING", flush=True)
    time.sleep(60)
    return real_scan(*args, **kwargs)
carlos.corpus.scan = scan
"""


STOPS = [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl+C")]
if sys.platform != "win32":
    STOPS += [(signal.SIGHUP, 129, "SIGHUP"), (signal.SIGUSR1, 138, "SIGUSR1")]


@pytest.mark.slow
@posix
@pytest.mark.parametrize("patch", [SLOW_SCAN, SLOW_PACK], ids=["while-scanning", "while-packing"])
@pytest.mark.parametrize("signum, code, name", STOPS)
@pytest.mark.parametrize("again", [False, True], ids=["new-workdir", "prepared-before"])
def test_a_signal_during_prepare_cleans_up_and_says_one_line(here, patch, signum, code, name, again):
    prep = ["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32", "--overwrite"]
    if again:
        assert subprocess.run([CARLOS, *prep], cwd=here, capture_output=True).returncode == 0
        before = {p.name: p.read_bytes() for p in (here / "w").rglob("*") if p.is_file()}
    script = f"import sys\nfrom carlos.cli import main\n{patch}\nmain({prep!r})\n"
    p = subprocess.Popen(
        [sys.executable, "-c", script], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() in ("SCANNING", "PACKING")
    p.send_signal(signum)
    out, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert err == f"carlos: stopped by {name}; nothing half-written was left\n"
    if again:
        assert {p.name: p.read_bytes() for p in (here / "w").rglob("*") if p.is_file()} == before
    else:
        assert not (here / "w").exists()


@pytest.mark.slow
@posix
@pytest.mark.parametrize(
    "argv",
    [["report", "w"], ["sample", "--workdir", "w", "--max_new_tokens", "3000", "--num_samples", "3"]],
    ids=["report", "sample"],
)
def test_a_reader_that_goes_away_ends_the_command_quietly(here, argv):
    """carlos ... | head: when stdout's reader exits, carlos stops without a word (141, as SIGPIPE would)."""
    tiny = ["model.d_model=32", "model.n_heads=2", "--micro_batch_size", "4", "--sample_tokens", "0"]
    subprocess.run([CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], cwd=here)
    subprocess.run([CARLOS, "train", "--workdir", "w", *tiny, "--max_steps", "2", "--eval_interval", "2"], cwd=here)
    p = subprocess.Popen([CARLOS, *argv], cwd=here, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(5)
    p.stdout.close()  # the reader goes away
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) in (0, 141) and err == "", err
