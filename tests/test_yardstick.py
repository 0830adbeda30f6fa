"""carlos eval's yardstick: the reference compressors on the split's bytes, and --adapt (dynamic evaluation)."""

import bz2
import hashlib
import json
import sys

import pytest

from carlos.compressors import compressed_bpb
from tests.conftest import copy_trained, run_cli


def test_a_compressor_reads_the_context_first_and_is_charged_only_for_the_text():
    text = b"the same licence text, clause after clause. " * 40
    alone, after = compressed_bpb(b"", text), compressed_bpb(text, text)
    assert set(after) >= {"zlib -9", "bzip2 -9", "xz -9e"}
    for name in after:
        assert after[name] < 0.5 * alone[name]  # what it has read before costs little to say again
    assert after["bzip2 -9"] == 8 * (len(bz2.compress(2 * text, 9)) - len(bz2.compress(text, 9))) / len(text)


@pytest.fixture
def w(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(copy_trained(trained, tmp_path))
    return tmp_path / "w"


def split_bytes(w, split):
    info = json.loads((w / "splits.json").read_text())["splits"][split]
    return (w.parent / "corpus.txt").read_bytes()[info["start"] : info["end"]]


@pytest.mark.slow
def test_eval_reports_the_compressors_on_the_split_after_the_train_text(w, capsys):
    evaluate = ["eval", "--workdir", "w", "--split", "test", "--json"]
    code, out, _ = run_cli(evaluate, capsys)
    result = json.loads(out.strip().splitlines()[-1])
    train, test = split_bytes(w, "train"), split_bytes(w, "test")
    expected = compressed_bpb(train[-1_000_000:], test)
    assert code == 0 and result["compressors"] == {"context_bytes": len(train), **expected}
    assert "PPMd order 6" in expected  # the test environment has the extra
    assert f"compressors on the split's {len(test):,} bytes, after the last {len(train):,} bytes of the train" in out
    assert f"PPMd order 6 {expected['PPMd order 6']:.4f}" in out
    # the context is capped; the train split itself is scored on its own; and they can be left out
    _, out, _ = run_cli([*evaluate, "--compressor_context", "100"], capsys)
    assert (
        json.loads(out.strip().splitlines()[-1])["compressors"]["xz -9e"]
        == compressed_bpb(train[-100:], test)["xz -9e"]
    )
    _, out, _ = run_cli(["eval", "--workdir", "w", "--split", "train", "--json"], capsys)
    assert json.loads(out.strip().splitlines()[-1])["compressors"]["context_bytes"] == 0
    _, out, _ = run_cli([*evaluate, "--compressors", "false"], capsys)
    assert json.loads(out.strip().splitlines()[-1])["compressors"] is None and "compressors on" not in out


def test_without_pyppmd_eval_says_what_to_install(w, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyppmd", None)  # import pyppmd raises ImportError
    code, out, _ = run_cli(["eval", "--workdir", "w", "--split", "val", "--json"], capsys)
    assert code == 0 and "PPMd order 6" not in json.loads(out.strip().splitlines()[-1])["compressors"]
    assert "PPMd not measured: PPMd needs the pyppmd package: pip install pyppmd" in out


@pytest.mark.slow
def test_adapt_scores_after_learning_from_the_text_before_and_changes_nothing_on_disk(w, capsys):
    best = w / "checkpoints" / "best.pt"
    before = hashlib.sha256(best.read_bytes()).hexdigest()
    evaluate = ["eval", "--workdir", "w", "--split", "val", "--json", "--compressors", "false"]
    _, out, _ = run_cli([*evaluate, "--stride", "8"], capsys)
    static = json.loads(out.strip().splitlines()[-1])
    _, out, _ = run_cli([*evaluate, "--stride", "8", "--adapt", "--adapt_lr", "1e-12"], capsys)
    unmoved = json.loads(out.strip().splitlines()[-1])
    # the standard and sliding passes are as they were; a step of nothing scores as the sliding windows do
    assert {k: v for k, v in unmoved.items() if k != "adaptive"} == {k: v for k, v in static.items() if k != "adaptive"}
    assert unmoved["adaptive"]["bpb"] == pytest.approx(static["sliding"]["bpb"], rel=1e-6)
    _, out, _ = run_cli([*evaluate, "--adapt"], capsys)
    adaptive = json.loads(out.strip().splitlines()[-1])["adaptive"]
    assert adaptive["stride"] == 16 and adaptive["lr"] == 0.012 and adaptive["clip"] == 2.0  # half the context
    assert adaptive["bpb"] != pytest.approx(static["sliding"]["bpb"], rel=1e-3)
    assert "adaptive (dynamic evaluation: SGD at lr 0.012, gradients clipped to 2, on each window of 16 new" in out
    assert hashlib.sha256(best.read_bytes()).hexdigest() == before
