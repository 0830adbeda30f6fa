"""Property tests (hypothesis): prepare on arbitrary bytes either refuses in one line or writes windows
that decode back to exactly the split texts; the tokenizer round-trips any text; sampling never leaves
the vocabulary; evaluation is deterministic."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from carlos.compose import compose
from carlos.config import PrepareConfig, parse
from carlos.errors import CarlosError
from carlos.evaluate import score_split, sliding_windows
from carlos.generate import filter_logits, generate
from carlos.model import GPT
from carlos.prepare import prepare, tokenize, tokenize_split
from carlos.tokenizer import BOS_ID, EOS_ID, ByteTokenizer
from carlos.workdir import WindowDataset
from tests.conftest import gpt_config

from .test_prepare import unpack

# examples per test come from the profile: 60 in the suite, more with HYPOTHESIS_PROFILE=deep (conftest.py)
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text with the structure corpora have (lines, blank lines, non-ASCII, NFKC-sensitive characters)
LINE = st.lists(st.sampled_from([*"ab cé\tﬁ①Å😀ｱ§", "e\u0301", "\r"]), max_size=40).map("".join)
TEXT = st.lists(LINE, min_size=0, max_size=60).map("\n".join)
CORPUS = st.one_of(
    TEXT.map(lambda t: t.encode("utf-8")),  # valid UTF-8
    st.binary(max_size=400),  # anything at all
    st.tuples(TEXT, st.binary(min_size=1, max_size=3), TEXT).map(lambda p: p[0].encode() + p[1] + p[2].encode()),
)
SEPARATORS = st.sampled_from(["\n\n", "\n", "§", "ab"])


def _prepare(raw: bytes, seq_len: int, nfkc: bool, bos: bool, eos: bool, sep: str) -> tuple[Path, dict | str]:
    d = Path(tempfile.mkdtemp())
    (d / "corpus.bin").write_bytes(raw)
    cfg = compose(
        "prepare",
        [
            f"input={d / 'corpus.bin'}",
            f"workdir={d / 'w'}",
            f"data.seq_len={seq_len}",
            f"data.normalize_nfkc={nfkc}",
            f"data.add_bos={bos}",
            f"data.add_eos={eos}",
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
        ],
    )
    cfg.data.separator = sep  # set directly: the composed override would need escaping
    try:
        return d, prepare(parse(cfg, PrepareConfig))
    except CarlosError as e:
        return d, str(e)


@SETTINGS
@given(raw=CORPUS, seq_len=st.integers(1, 8), nfkc=st.booleans(), bos=st.booleans(), eos=st.booleans(), sep=SEPARATORS)
def test_prepare_refuses_clearly_or_round_trips(raw, seq_len, nfkc, bos, eos, sep) -> None:
    d, result = _prepare(raw, seq_len, nfkc, bos, eos, sep)
    try:
        if isinstance(result, str):  # refused: one line, the right reason, and nothing written
            assert "\n" not in result
            assert not (d / "w").exists(), "a refused prepare left its workdir behind"
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                assert "is not UTF-8" in result and f"at offset {e.start}" in result, result
                return
            assert ("is empty" in result) if not raw else ("fewer than one window of seq_len+1" in result), result
            return
        raw.decode("utf-8")  # accepted: so it was UTF-8 (this raises otherwise)
        info = json.loads((d / "w" / "splits.json").read_text())
        assert info["splits"]["test"]["end"] == len(raw)
        tok = ByteTokenizer(add_bos=bos, add_eos=eos)
        for name in ("train", "val", "test"):
            s = info["splits"][name]
            split_text = raw[s["start"] : s["end"]].decode("utf-8")  # splits are cut at character boundaries
            if nfkc:
                split_text = unicodedata.normalize("NFKC", split_text)
            stream = unpack(np.load(d / "w" / "data" / f"{name}.npy"), info["tokens"][name])
            windows = WindowDataset(np.load(d / "w" / "data" / f"{name}.npy"), n_tokens=info["tokens"][name])
            assert np.array_equal(windows.stream(), stream)  # what carlos eval --stride scores
            assert stream.max() < tok.vocab_size
            assert tok.decode_bytes(stream) == split_text.encode("utf-8")
            docs = [doc for doc in split_text.split(sep) if doc] if (bos or eos) else []
            assert (stream == BOS_ID).sum() == (len(docs) if bos else 0)
            assert (stream == EOS_ID).sum() == (len(docs) if eos else 0)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@SETTINGS
@given(text=TEXT, chunk=st.integers(1, 64), nfkc=st.booleans(), bos=st.booleans(), eos=st.booleans(), sep=SEPARATORS)
def test_streaming_in_any_chunk_size_equals_tokenizing_at_once(text, chunk, nfkc, bos, eos, sep) -> None:
    raw = text.encode("utf-8")
    tok = ByteTokenizer(add_bos=bos, add_eos=eos)
    out = io.BytesIO()
    n, _ = tokenize_split(io.BytesIO(raw), 0, len(raw), tok, sep, nfkc, out, chunk=chunk)
    streamed = np.frombuffer(out.getvalue(), dtype=tok.dtype)
    whole = tokenize(unicodedata.normalize("NFKC", text) if nfkc else text, tok, sep)
    assert n == len(streamed) and streamed.tolist() == whole.tolist()


@SETTINGS
@given(text=st.text(), bos=st.booleans(), eos=st.booleans())
def test_tokenizer_round_trip(text, bos, eos) -> None:
    tok = ByteTokenizer(add_bos=bos, add_eos=eos)
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_document(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    if bos:
        assert ids[0] == BOS_ID
    if eos:
        assert ids[-1] == EOS_ID
    assert ByteTokenizer.from_dict(json.loads(json.dumps(tok.to_dict()))) == tok


def _tiny_model(vocab: int, seed: int, block: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config(vocab_size=vocab, block_size=block, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()


@SETTINGS
@given(
    vocab=st.sampled_from([256, 257, 258]),
    seed=st.integers(0, 2**16),
    temperature=st.one_of(st.just(0.0), st.floats(1e-6, 10.0), st.floats(1e-45, 1e-30)),
    top_k=st.integers(0, 300),
    top_p=st.floats(1e-6, 1.0),
    prompt=st.lists(st.integers(0, 255), min_size=1, max_size=20),
)
def test_sampling_stays_in_the_vocabulary(vocab, seed, temperature, top_k, top_p, prompt) -> None:
    model = _tiny_model(vocab, seed)
    g = torch.Generator().manual_seed(seed)
    out = generate(model, prompt, 24, temperature, top_k, top_p, g)  # 24 > block 16: the window slides
    assert len(out) == 24 and all(0 <= i < vocab for i in out)


@SETTINGS
@given(
    logits=st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=40),
    temperature=st.floats(1e-45, 10.0),
    top_k=st.integers(0, 50),
    top_p=st.floats(1e-6, 1.0),
)
def test_filtering_keeps_the_most_likely_token(logits, temperature, top_k, top_p) -> None:
    x = torch.tensor(logits)
    kept = filter_logits(x, temperature, top_k, top_p)
    probs = torch.softmax(kept, dim=-1)
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-4
    assert torch.isfinite(kept[torch.argmax(x)])
    # what is kept is the top of the ranking: every logit above a kept one is kept too
    kept_mask = torch.isfinite(kept)
    lowest = x[kept_mask].min()
    assert kept_mask[x > lowest].all()
    if top_k:  # and within the top k, ties with the k-th kept as well
        assert int((x > lowest).sum()) < top_k


class _Windows:
    """The WindowDataset interface score_split uses: dataset[list of indices] -> (x, y)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.w = windows

    def __len__(self) -> int:
        return len(self.w)

    def __getitem__(self, idx: list[int]):
        rows = self.w[idx]
        return rows[:, :-1], rows[:, 1:]


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), batch=st.integers(1, 12), other=st.integers(1, 12))
def test_eval_is_deterministic(seed, n, batch, other) -> None:
    assume(batch != other)
    model = _tiny_model(256, seed)
    windows = _Windows(torch.randint(0, 256, (n, 17), generator=torch.Generator().manual_seed(seed)))
    first = score_split(model, windows, batch, torch.device("cpu"))
    assert score_split(model, windows, batch, torch.device("cpu")) == first  # bit for bit
    regrouped = score_split(model, windows, other, torch.device("cpu"))
    assert regrouped["tokens"] == first["tokens"] == n * 16 and regrouped["bytes"] == first["bytes"]
    assert regrouped["loss"] == pytest.approx(first["loss"], rel=1e-5)


@SETTINGS
@given(n_tokens=st.integers(2, 400), context=st.integers(1, 64), stride=st.integers(1, 64))
def test_sliding_windows_score_every_target_once_with_the_context_promised(n_tokens, context, stride) -> None:
    assume(stride <= context)
    windows = sliding_windows(n_tokens, context, stride)
    width = min(context, n_tokens - 1)
    scored = [t for start, first in windows for t in range(start + first, start + width)]
    assert scored == list(range(n_tokens - 1))  # target t is token t + 1: each once, in order
    for i, (start, first) in enumerate(windows):
        assert start >= 0 and start + width <= n_tokens - 1  # inside the stream
        if i:  # every target after the first window's sees at least width - stride tokens before it
            assert first >= width - stride
