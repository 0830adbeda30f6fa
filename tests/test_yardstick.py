"""carlos eval's yardstick: the reference compressors on the split's bytes, and --adapt (dynamic evaluation
mixed with an n-gram of the text before)."""

import bz2
import hashlib
import json
import sys

import numpy as np
import pytest

from carlos.compressors import compressed_bpb
from carlos.ngram import mix, ngram_probs
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
    _, out, _ = run_cli([*evaluate, "--stride", "8", "--adapt", "--adapt_lr", "1e-12", "--adapt_order", "0"], capsys)
    unmoved = json.loads(out.strip().splitlines()[-1])
    # the standard and sliding passes are as they were; a step of nothing scores as the sliding windows do
    assert {k: v for k, v in unmoved.items() if k != "adaptive"} == {k: v for k, v in static.items() if k != "adaptive"}
    assert unmoved["adaptive"]["bpb"] == pytest.approx(static["sliding"]["bpb"], rel=1e-6)
    _, out, _ = run_cli([*evaluate, "--adapt"], capsys)
    adaptive = json.loads(out.strip().splitlines()[-1])["adaptive"]
    assert adaptive["stride"] == 16 and adaptive["lr"] == 0.012 and adaptive["clip"] == 2.0  # half the context
    assert adaptive["dynamic_bpb"] != pytest.approx(static["sliding"]["bpb"], rel=1e-3)
    assert "adaptive (dynamic evaluation: SGD at lr 0.012, gradients clipped to 2, on each window of 16 new" in out
    # then mixed with an order-12 n-gram of the train split's end and the text before each byte
    assert adaptive["order"] == 12 and 0 < adaptive["weight"] < 1 and adaptive["bpb"] != adaptive["dynamic_bpb"]
    assert f"bits-per-byte {adaptive['bpb']:.4f}" in out.split("mixed with an order-12 n-gram of the last ")[1]
    assert hashlib.sha256(best.read_bytes()).hexdigest() == before


def test_the_ngram_gives_each_token_a_distribution_over_the_vocabulary_from_the_tokens_before_it_only():
    tokens = np.random.default_rng(0).integers(0, 5, 300)
    probs = ngram_probs(tokens, 0, 6, order=3)
    for i in (0, 1, 7, 150, 299):
        candidates = [ngram_probs(np.r_[tokens[:i], token], i, 6, order=3)[0] for token in range(6)]
        assert sum(candidates) == pytest.approx(1.0, abs=1e-12)  # every token of the vocabulary, one of them seen
        assert candidates[tokens[i]] == probs[i]  # and nothing after position i changed it
    assert probs[0] == pytest.approx(1 / 6)  # before any text: uniform


def test_the_ngram_predicts_what_it_has_seen_before_after_a_long_enough_context():
    phrase = np.frombuffer(b"Permission is hereby granted, free of charge, to any person", np.uint8)
    probs = ngram_probs(np.r_[phrase, phrase], 0, 256, order=12)
    first, again = probs[: len(phrase)], probs[len(phrase) + 12 :]
    assert first.mean() < 0.1 and again.min() > 0.9  # the repeat, once 12 tokens of it have recurred


def test_the_mixture_leans_towards_the_predictor_that_has_been_right_and_each_weight_comes_before_its_token():
    good, poor = np.full(2000, 0.9), np.full(2000, 0.1)
    mixed, weight = mix(good, poor)
    assert mixed[0] == 0.5 and weight > 0.9 and mixed[-1] > mixed[1000] > mixed[1] > 0.5
    assert mix(poor, good)[1] < 0.1  # the same, with the roles swapped
    alone, _ = mix(good[:100], good[:100])
    assert np.allclose(alone, 0.9)  # two equal predictors mix to the same probabilities
    changed, _ = mix(np.r_[good[:100], poor[:1]], np.r_[poor[:100], good[:1]])
    assert np.array_equal(changed[:100], mix(good[:100], poor[:100])[0])  # a token changes only what comes after
