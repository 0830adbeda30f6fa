"""`carlos bench` end to end on a tiny corpus: every section runs and writes its table."""

from pathlib import Path

import pytest

from carlos.cli import main

from .conftest import make_corpus


@pytest.mark.slow
def test_bench_writes_its_sections(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt", n_lines=1500)
    out = tmp_path / "PERF.md"
    out.write_text("# Performance\n\nkept text\n")
    main(
        [
            "bench",
            f"input={corpus}",
            f"workdir={tmp_path / 'b'}",
            f"output={out}",
            "rounds=1",
            "steps=9",
            "log_interval=3",
            "seq_len=32",
            "batch=4",
            "kv_context=64",
            "budgets=[3]",
            "prepare_gb=0.002",
        ]
    )
    text = out.read_text()
    assert text.startswith("# Performance\n\nkept text\n")
    for marker in ("bench", "quality", "scale"):
        assert text.count(f"<!-- {marker}:start -->") == 1 and text.count(f"<!-- {marker}:end -->") == 1
    assert "| **ratio DDP / one process**" in text
    assert "| **ratio carlos / plain**" in text and "| 3 s |" in text and "MB/s" in text
    printed = capsys.readouterr().out
    assert "round 1/1   carlos:" in printed and "round 1/1    plain:" in printed and "round 1/1 defaults:" in printed
    assert "round 1/1      ddp:" in printed


@pytest.mark.slow
def test_bench_writes_into_its_workdir_unless_told_a_file(tmp_path, monkeypatch, capsys):
    corpus = make_corpus(tmp_path / "corpus.txt", n_lines=300)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "PERFORMANCE.md").write_text("my own notes\n")
    main(["bench", f"input={corpus}", "workdir=b", "rounds=0", "prepare_gb=0.001"])
    assert (tmp_path / "docs" / "PERFORMANCE.md").read_text() == "my own notes\n"  # a file of the same name
    assert "<!-- scale:start -->" in (tmp_path / "b" / "PERFORMANCE.md").read_text()
    assert capsys.readouterr().out.endswith(f"{Path('b') / 'PERFORMANCE.md'}\n")  # the last line: wrote PATH
