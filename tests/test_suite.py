"""carlos bench's suite: the corpora it builds from this machine, and the runs it keeps and continues."""

from __future__ import annotations

import gettext
import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from carlos.bench.suite import CORPORA, LOCALES, mo_messages, render_suite, suite_runs
from carlos.config import SUITE_CORPORA


def test_every_suite_corpus_has_a_builder():
    assert ("input", *CORPORA) == SUITE_CORPORA


@pytest.mark.skipif(not any(LOCALES.glob("*/LC_MESSAGES/*.mo")), reason="no translations on this machine")
def test_mo_messages_are_the_translations_gettext_reads():
    path = sorted(LOCALES.glob("*/LC_MESSAGES/*.mo"))[0]
    data = path.read_bytes()
    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog  # Python's own reader of the format
    want = {text for key, text in catalog.items() if key != "" and text}
    assert set(mo_messages(data)) == want


def test_built_corpora_are_deterministic_and_sized():
    for name, build in CORPORA.items():
        text = build(50_000)
        if text:  # docs and translations need /usr/share
            assert len(text.encode("utf-8")) >= 50_000 or name != "python"
            assert build(50_000) == text, name


def test_the_suite_keeps_each_run_and_continues_where_it_stopped(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text")
    cfg = SimpleNamespace(suite=["input"], input=str(corpus), suite_bytes=1, suite_budgets=[60], seeds=3)
    cfg.against = ["optimizer=adamw"]
    calls = []

    def train(workdir: Path, overrides: list[str]) -> dict:
        calls.append(overrides)
        if len(calls) == 4:
            raise KeyboardInterrupt  # stopped in the middle
        better = 0.0 if "optimizer=adamw" in overrides else 0.1
        compressors = {"context_bytes": 1000, "xz -9e": 2.6, "PPMd order 6": 2.1}
        scores = {"test_bpb": 2.5 - better, "val_bpb": 2.4 - better, "adaptive_bpb": 2.2, "compressors": compressors}
        return {**scores, "tokens": 100, "epochs": 2.0}

    prepare = lambda corpus, workdir: {"splits": {"train": {"start": 0, "end": 1000}}}  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        suite_runs(cfg, train, prepare, tmp_path)
    # seeds alternate which side runs first: against, defaults, then defaults, against
    sides = [("optimizer=adamw" in c, c[2]) for c in calls]
    assert sides == [(True, "seed=1"), (False, "seed=1"), (False, "seed=2"), (True, "seed=2")]
    assert calls[0][:2] == ["run=against-60s-seed1", "trainer.max_time=60"]
    rows = suite_runs(cfg, train, prepare, tmp_path)  # continues: only the runs not yet in results.jsonl
    assert len(calls) == 4 + 3 and len(rows) == 6
    table = render_suite(["Machine: x"], cfg.against, rows)
    row = "| input | 1,000 | 60 s | 2.5000 | 2.4000 | +0.1000 | 3 of 3 | 2.4000 / 2.3000 | 2.0 |"
    assert row + " 2.2000 | 2.6000 | 2.1000 |" in table  # the defaults' adaptive score, xz and PPMd
