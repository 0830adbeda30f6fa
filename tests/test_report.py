"""carlos report on hand-made run directories: which settings show, the order, the plot, refusals."""

import json

import pytest

from carlos.config import CarlosError
from carlos.report import differing, find_runs, report


def _run(d, lr, model, bpbs, rate=1000.0):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(
        f"workdir: W\nseed: 1\noptimizer:\n  lr: {lr}\nmodel:\n  d_model: {model}\nscaled: ${{optimizer.lr}}\n"
    )
    lines = [{"step": 10, "tokens": 100, "train_loss": 2.0, "tokens_per_s": rate, "elapsed_s": 1}]
    lines += [{"step": 10 * (i + 1), "tokens": 100 * (i + 1), "val_bpb": b, "val_loss": b} for i, b in enumerate(bpbs)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9')  # cut short


def test_table_lists_differing_settings_best_first_and_plots(tmp_path):
    _run(tmp_path / "0", 0.001, 64, [3.0, 2.5])
    _run(tmp_path / "1", 0.003, 64, [2.9, 2.2], rate=2000.0)
    _run(tmp_path / "10", 0.003, 128, [2.8, 2.4])
    runs = find_runs(tmp_path)
    assert [r.name for r in runs] == ["0", "1", "10"]  # numeric order
    assert differing(runs) == ["model.d_model", "optimizer.lr", "scaled"]  # resolved interpolation differs too
    text, png = report(tmp_path)
    rows = text.splitlines()
    assert rows[0] == "| run | model.d_model | optimizer.lr | scaled | steps | tokens | best val bpb | tokens/s |"
    assert rows[2] == "| 1 | 64 | 0.003 | 0.003 | 20 | 200 | 2.2000 | 2,000 |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 1", "| 10", "| 0"]
    assert png == tmp_path / "report.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_single_run_and_refusals(tmp_path):
    _run(tmp_path / "only", 0.001, 64, [3.0])
    text, _ = report(tmp_path / "only", tmp_path / "x.png")
    assert text.splitlines()[2] == "| only | 10 | 100 | 3.0000 | 1,000 |"
    with pytest.raises(CarlosError, match="does not exist"):
        find_runs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CarlosError, match="no runs under"):
        find_runs(tmp_path / "empty")
