import hashlib
import json
import unicodedata

import numpy as np
import pytest

from carlos.corpus import scan
from carlos.errors import CarlosError
from carlos.prepare import DocumentTokens, pack, tokenize, tokenize_split
from carlos.tokenizer import ByteTokenizer
from carlos.workdir import PreparedData

from .conftest import prepare_workdir


def unpack(windows: np.ndarray, n_tokens: int) -> np.ndarray:
    """The token stream back from stride-seq_len windows (the last one right-aligned)."""
    seq_len = windows.shape[1] - 1
    stream = list(windows[0])
    for w in windows[1:-1]:
        stream += list(w[1:])
    if len(windows) > 1:
        new = n_tokens - len(stream)
        stream += list(windows[-1][len(windows[-1]) - new :])
    assert len(stream) == n_tokens, seq_len
    return np.array(stream)


def test_splits_json_is_exactly_the_documented_record(corpus, workdir):
    info = json.loads((workdir / "splits.json").read_text())
    raw = corpus.read_bytes()
    assert set(info["splits"]) == {"train", "val", "test"}
    ends = []
    for name in ("train", "val", "test"):
        s = info["splits"][name]
        assert set(s) == {"start", "end", "bytes", "sha256"}
        assert s["bytes"] == s["end"] - s["start"]
        assert s["sha256"] == hashlib.sha256(raw[s["start"] : s["end"]]).hexdigest()
        ends.append(s["end"])
        # cut at a line boundary
        assert s["start"] == 0 or raw[s["start"] - 1 : s["start"]] == b"\n"
    assert info["splits"]["train"]["start"] == 0
    assert info["splits"]["val"]["start"] == info["splits"]["train"]["end"]
    assert info["splits"]["test"]["start"] == info["splits"]["val"]["end"]
    assert info["splits"]["test"]["end"] == len(raw) == info["size"]
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()
    assert info["input"] == str(corpus.resolve())
    assert info["normalization"] is None and info["add_bos"] is False and info["add_eos"] is False
    assert info["seq_len"] == 32
    # about 90/5/5
    assert abs(info["splits"]["val"]["bytes"] / len(raw) - 0.05) < 0.01
    assert json.loads((workdir / "rng_state.json").read_text())["seed"] == 1337
    assert json.loads((workdir / "tokenizer.json").read_text())["vocab_size"] == 256


def test_every_token_is_used_and_decodes_to_the_split_text(corpus, workdir):
    info = json.loads((workdir / "splits.json").read_text())
    raw = corpus.read_bytes()
    for name in ("train", "val", "test"):
        arr = np.load(workdir / "data" / f"{name}.npy")
        assert arr.dtype == np.uint8 and arr.shape[1] == 33
        s = info["splits"][name]
        assert unpack(arr, info["tokens"][name]).astype(np.uint8).tobytes() == raw[s["start"] : s["end"]]


def test_tail_window_targets_are_masked_so_each_token_is_scored_once(workdir):
    data = PreparedData.load(workdir)
    ds = data.windows("val")
    n_tokens = data.info["tokens"]["val"]
    scored = 0
    for i in range(len(ds)):
        _, y = ds[[i]]
        scored += int((y >= 0).sum())
    assert scored == n_tokens - 1  # every token but the first is predicted exactly once


def _pack(tokens: np.ndarray, seq_len: int, tmp_path) -> list:
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    n = pack(tmp_path / "t.bin", len(tokens), seq_len, tokens.dtype, tmp_path / "w.npy", windows_per_block=1)
    arr = np.load(tmp_path / "w.npy")
    assert len(arr) == n
    return arr.tolist()


def test_pack_small_example(tmp_path):
    assert _pack(np.arange(10, dtype=np.uint8), 4, tmp_path) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [5, 6, 7, 8, 9]]
    assert _pack(np.arange(9, dtype=np.uint16), 4, tmp_path) == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]]


def test_bos_eos_wrap_documents_and_keep_the_separator_bytes():
    tok = ByteTokenizer(add_bos=True, add_eos=True)
    ids = tokenize("a\n\nb\n\n", tok, "\n\n").tolist()
    assert ids == [256, 97, 257, 10, 10, 256, 98, 257, 10, 10]
    assert tok.decode(ids) == "a\n\nb\n\n"


def test_nfkc_normalizes_each_split_and_keeps_input_offsets(corpus, tmp_path):
    wd = prepare_workdir(
        corpus, tmp_path / "nfkc", "data.normalize_nfkc=true", "data.add_bos=true", "data.add_eos=true"
    )
    info = json.loads((wd / "splits.json").read_text())
    assert info["normalization"] == "NFKC" and info["add_bos"] and info["add_eos"]
    raw = corpus.read_bytes()
    tok = ByteTokenizer(True, True)
    arr = np.load(wd / "data" / "train.npy")
    assert arr.dtype == np.uint16
    s = info["splits"]["train"]
    stream = unpack(arr, info["tokens"]["train"])
    expected = unicodedata.normalize("NFKC", raw[s["start"] : s["end"]].decode())
    assert tok.decode(stream) == expected
    assert "ﬁ" not in expected and "fi" in expected
    assert (stream == 256).sum() > 10  # many documents


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"short\n", "fewer than one window"),
        (b"ok text\n" * 200 + b"\xff\xfe bad" + b"more\n" * 100, "not UTF-8: first bad byte 0xff at offset 1600"),
    ],
)
def test_bad_corpus_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CarlosError, match=message):
        prepare_workdir(path, tmp_path / "w")
    assert not (tmp_path / "w" / "splits.json").exists()


def test_a_missing_input_and_a_directory_without_text_files_are_refused(tmp_path):
    with pytest.raises(CarlosError, match="does not exist"):
        prepare_workdir(tmp_path / "nope.txt", tmp_path / "w")
    with pytest.raises(CarlosError, match=r"holds no file matching '\*.txt'; pass --glob PATTERN"):
        prepare_workdir(tmp_path, tmp_path / "w")  # a directory is read for its *.txt files: it has none
    assert not (tmp_path / "w").exists()


def test_unprepared_and_half_prepared_workdirs_are_refused(workdir, tmp_path):
    with pytest.raises(CarlosError, match="not prepared"):
        PreparedData.load(tmp_path / "empty")
    (workdir / "data" / "val.npy").unlink()
    with pytest.raises(CarlosError, match="half-prepared"):
        PreparedData.load(workdir)


def test_prepare_again_replaces_the_data_and_leaves_no_temporary_files(corpus, workdir):
    prepare_workdir(corpus, workdir, "data.seq_len=16")
    assert json.loads((workdir / "splits.json").read_text())["seq_len"] == 16
    left = sorted(p.name for p in workdir.iterdir())
    assert left == [".carlos-files", "data", "rng_state.json", "splits.json", "tokenizer.json"]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("bos, eos, nfkc", [(False, False, False), (True, True, True), (False, True, False)])
def test_streaming_in_chunks_gives_the_tokens_of_the_whole_text(tmp_path, chunk, bos, eos, nfkc):
    text = "café ﬁn\n\nsecond doc é\nmore\n\n\n\nthird ü🙂\n\nlast line without newline ﬀ"
    raw = text.encode("utf-8")
    (tmp_path / "in.txt").write_bytes(raw)
    tok = ByteTokenizer(add_bos=bos, add_eos=eos)
    whole = unicodedata.normalize("NFKC", text) if nfkc else text
    expected = tokenize(whole, tok, "\n\n").tolist()
    with open(tmp_path / "in.txt", "rb") as src, open(tmp_path / "out.bin", "wb") as out:
        n, digest = tokenize_split(src, 0, len(raw), tok, "\n\n", nfkc, out, chunk=chunk)
    got = np.fromfile(tmp_path / "out.bin", dtype=tok.dtype).tolist()
    assert got == expected and n == len(expected)
    assert digest == hashlib.sha256(raw).hexdigest()
    assert tok.decode(got) == whole


def test_documents_stream_without_holding_a_whole_document():
    tok = ByteTokenizer(add_bos=True, add_eos=True)
    docs = DocumentTokens(tok, "<sep>")
    first = docs.feed("x" * 1000).tolist()
    assert first[0] == 256 and len(first) == 1 + 1000 - 4  # only a possible start of "<sep>" is held back
    assert len(docs.carry) == 4
    rest = docs.feed("<sep>y").tolist() + docs.finish().tolist()
    assert first + rest == tokenize("x" * 1000 + "<sep>y", tok, "<sep>").tolist()


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_scan_finds_the_first_bad_byte_across_chunk_boundaries(tmp_path, chunk):
    path = tmp_path / "c.txt"
    path.write_bytes("aé".encode() + b"\xc3" + b"x")  # a 2-byte lead cut short at offset 3
    with pytest.raises(CarlosError, match="first bad byte 0xc3 at offset 3"), open(path, "rb") as f:
        scan(f, chunk=chunk)
    path.write_bytes("aé🙂".encode()[:-1])
    with pytest.raises(CarlosError, match="ends inside a character at offset 3"), open(path, "rb") as f:
        scan(f, chunk=chunk)
    path.write_bytes("aé🙂\n".encode())
    with open(path, "rb") as f:
        assert scan(f, chunk=chunk) == (8, hashlib.sha256("aé🙂\n".encode()).hexdigest())
