"""carlos report on hand-made run directories: which settings show, the order, the plot, refusals."""

import builtins
import errno
import json
import math
import os
from pathlib import Path

import pytest

from carlos.cli import main
from carlos.errors import CarlosError
from carlos.manifest import RECORD
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


# ---------------------------------------------------------------- damaged and unusual files, through the CLI

HEAD = "| run | optimizer.lr | scaled | steps | tokens | best val bpb | tokens/s |"
RULE = "|---|---|---|---|---|---|---|"
ROW_0 = "| 0 | 0.001 | 0.001 | 20 | 200 | 2.5000 | 1,000 |"  # _run(d / "0", 0.001, 64, [3.0, 2.5])
ROW_1 = "| 1 | 0.003 | 0.003 | 20 | 200 | 2.2000 | 1,000 |"  # _run(d / "1", 0.003, 64, [2.9, 2.2])


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Run in tmp_path, so the printed paths are short and exact."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CARLOS_DEBUG", raising=False)
    return tmp_path


def _sweep(d):
    """Two good runs, 0 and 1, under d."""
    _run(d / "0", 0.001, 64, [3.0, 2.5])
    _run(d / "1", 0.003, 64, [2.9, 2.2])


def _lines(capsys, *args) -> list[str]:
    """carlos report in this process: what it printed on stdout. A SystemExit here fails the test, and
    anything on stderr (a traceback, a warning) too."""
    main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    assert err == ""
    return out.splitlines()


def _refusal(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["report", *map(str, args)])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("carlos: error: ")
    return err.strip()


def _metrics(d, *lines: str | bytes) -> None:
    d.mkdir(parents=True, exist_ok=True)
    data = [x if isinstance(x, bytes) else x.encode() for x in lines]
    (d / "metrics.jsonl").write_bytes(b"".join(x + b"\n" for x in data))


GOOD = ['{"step": 10, "tokens": 100, "tokens_per_s": 1000.0}', '{"step": 20, "tokens": 200, "val_bpb": 2.5}']


def test_a_run_cut_short_by_a_crash_is_reported_without_a_note(here, capsys):
    _sweep(here / "s")  # each metrics.jsonl ends in a record cut short
    assert _lines(capsys, "s") == [HEAD, RULE, ROW_1, ROW_0, "plot: s/report.png"]


@pytest.mark.parametrize(
    "bad",
    [
        ["[1, 2]", "3", '"x"', "null"],
        ["true", "[]", "{}x", "not json at all"],
        ["[" * 100_000, '{"a": ' * 100_000],  # nested deeper than Python's recursion limit
        ['{"step": 30', '{"step": 40, "tokens": 400, "val_bpb": 1.0}{"step"'],  # cut short mid-file
    ],
)
def test_lines_that_are_not_json_objects_are_skipped_and_noted(here, capsys, bad):
    _sweep(here / "s")
    _metrics(here / "s" / "2", GOOD[0], *bad, GOOD[1])
    assert _lines(capsys, "s") == [
        "| run | optimizer.lr | scaled | steps | tokens | best val bpb | tokens/s |",
        RULE,
        ROW_1,
        ROW_0,
        "| 2 | - | - | 20 | 200 | 2.5000 | 1,000 |",  # no .hydra: no settings
        f"note: run 2: {len(bad)} damaged lines in metrics.jsonl skipped",
        "plot: s/report.png",
    ]


@pytest.mark.parametrize(
    "value",
    ['"abc"', '"1.5"', "null", "NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400, "true", "false", "[1]", "{}"],
)
def test_a_number_that_is_not_a_finite_number_makes_its_line_damaged(here, capsys, value):
    # each line would change the row if it counted: more steps and tokens, a better bpb, another rate
    base = {"step": 90, "tokens": 900, "val_bpb": 0.5, "tokens_per_s": 9000.0}
    bad = [json.dumps({**base, key: "BAD"}).replace('"BAD"', value) for key in base]
    _metrics(here / "r", GOOD[0], *bad, GOOD[1])
    assert _lines(capsys, "r") == [
        "| run | steps | tokens | best val bpb | tokens/s |",
        "|---|---|---|---|---|",
        "| r | 20 | 200 | 2.5000 | 1,000 |",
        "note: run r: 4 damaged lines in metrics.jsonl skipped",
        "plot: r/report.png",
    ]


def test_one_damaged_line_and_other_fields_are_free(here, capsys):
    # fields other than the four read may be anything, e.g. train_loss null before the first step
    _metrics(here / "r", '{"step": 0, "train_loss": null, "lr": "warmup"}', '{"val_bpb": true}', GOOD[1])
    assert _lines(capsys, "r")[2:4] == [
        "| r | 20 | 200 | 2.5000 | - |",
        "note: run r: 1 damaged line in metrics.jsonl skipped",
    ]


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(128, 256)),
        '{"step": 10, "tokens": 100, "val_bpb": 2.5, "note": "café"}\n'.encode("latin-1"),
        '{"step": 10, "tokens": 100, "val_bpb": 2.5}\n'.encode("utf-16"),
        GOOD[1].encode() + b"\n\xc3\x28\n",  # one bad byte sequence after a good record
    ],
)
def test_metrics_that_is_not_utf8_skips_the_run(here, capsys, data):
    _sweep(here / "s")
    (here / "s" / "x" / "3").mkdir(parents=True)
    (here / "s" / "x" / "3" / "metrics.jsonl").write_bytes(data)
    lines = _lines(capsys, "s")
    assert lines == [HEAD, RULE, ROW_1, ROW_0, "skipped: x/3 (metrics.jsonl is not UTF-8 text)", "plot: s/report.png"]


@pytest.mark.parametrize("bad", [["[1]"], ["3", "null", '{"val_bpb": "abc"}']])
def test_a_run_with_no_readable_record_is_skipped(here, capsys, bad):
    _sweep(here / "s")
    _metrics(here / "s" / "2", *bad)
    n = f"{len(bad)} damaged line" + ("s" if len(bad) > 1 else "")
    assert _lines(capsys, "s")[4:] == [f"skipped: 2 (no readable record in metrics.jsonl, {n})", "plot: s/report.png"]


def _unreadable(files: list[Path], monkeypatch) -> None:
    """chmod 0, and since root reads anything, refuse them the way the kernel does for others."""
    locked = [f.resolve() for f in files]
    for f in locked:
        f.chmod(0)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).resolve() in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


def test_files_that_cannot_be_read(here, capsys, monkeypatch):
    _sweep(here / "s")
    _metrics(here / "s" / "2", GOOD[1])
    (here / "s" / "3" / "metrics.jsonl").mkdir(parents=True)
    for job in ("2", "3"):
        (here / "s" / job / "job.json").write_text('{"status": "ok"}')
    (here / "s" / "4" / "job.json").mkdir(parents=True)
    locked = ["2/metrics.jsonl", "1/.hydra/config.yaml", "3/job.json"]
    _unreadable([here / "s" / name for name in locked], monkeypatch)
    assert _lines(capsys, "s") == [
        "| run | steps | tokens | best val bpb | tokens/s |",  # only run 0 has settings: none differ
        "|---|---|---|---|---|",
        "| 1 | 20 | 200 | 2.2000 | 1,000 |",
        "| 0 | 20 | 200 | 2.5000 | 1,000 |",
        "note: run 1: .hydra/config.yaml cannot be read (Permission denied); shown without settings",
        "skipped: 2 (metrics.jsonl cannot be read: Permission denied)",
        "skipped: 3 (metrics.jsonl cannot be read: it is a directory)",
        "failed: 3 (job.json cannot be read: Permission denied)",
        "failed: 4 (job.json cannot be read: it is a directory)",
        "plot: s/report.png",
    ]


@pytest.mark.parametrize(
    "text, why",
    [
        (b"optimizer:\n  lr: [0.1\n", "is not valid YAML"),
        (b"a: 1\n\tb: 2\n", "is not valid YAML"),
        (b"a: \x01\x02\n", "is not valid YAML"),  # control characters
        (b"a: ${optimizer.\n", "is not valid YAML"),  # an interpolation OmegaConf cannot parse
        (b"a: 1\na: 2\n", "is not valid YAML"),  # a key twice
        (b"--- a: 1\n--- b: 2\n", "is not valid YAML"),
        (b"- 1\n- 2\n", "is not a mapping of settings"),
        (b"3\n", "is not a mapping of settings"),
        (b"garbage\n", "is not a mapping of settings"),
        (bytes(range(256)), "is not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
    ],
)
def test_a_damaged_config_snapshot_shows_the_run_without_settings(here, capsys, text, why):
    _sweep(here / "s")
    _run(here / "s" / "2", 0.002, 64, [2.0])
    (here / "s" / "2" / ".hydra" / "config.yaml").write_bytes(text)
    assert _lines(capsys, "s") == [
        HEAD,
        RULE,
        "| 2 | - | - | 10 | 100 | 2.0000 | 1,000 |",
        ROW_1,
        ROW_0,
        f"note: run 2: .hydra/config.yaml {why}; shown without settings",
        "plot: s/report.png",
    ]


def test_a_config_snapshot_with_odd_keys_and_values_still_shows(here, capsys):
    _metrics(here / "s" / "0", GOOD[1])
    _metrics(here / "s" / "1", GOOD[1])
    (here / "s" / "0" / ".hydra").mkdir()
    (here / "s" / "1" / ".hydra").mkdir()
    (here / "s" / "0" / ".hydra" / "config.yaml").write_text("a: [{1: x, b: y}]\n2: z\n")
    (here / "s" / "1" / ".hydra" / "config.yaml").write_text("a: []\n2: z\n")
    assert _lines(capsys, "s")[:4] == [
        "| run | a | steps | tokens | best val bpb | tokens/s |",
        "|---|---|---|---|---|---|",
        '| 0 | [{"1": "x", "b": "y"}] | 20 | 200 | 2.5000 | - |',
        "| 1 | [] | 20 | 200 | 2.5000 | - |",
    ]


@pytest.mark.parametrize(
    "job",
    [
        b'{"job": 2, "overrides": ["optimizer.lr=-1"], "status": "fai',  # cut short
        b"",
        b"[1, 2]",
        b'"ok"',
        b"null",
        b"{}",  # no status
        b'{"status": "failed", "overrides": "optimizer.lr=-1"}',
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
    ],
)
def test_a_damaged_job_json_is_listed_as_failed(here, capsys, job):
    _sweep(here / "s")
    (here / "s" / "0" / "job.json").write_text('{"job": 0, "overrides": ["optimizer.lr=0.001"], "status": "ok"}')
    (here / "s" / "2").mkdir()
    (here / "s" / "2" / "job.json").write_bytes(job)
    (here / "s" / "3").mkdir()
    (here / "s" / "3" / "job.json").write_text('{"job": 3, "overrides": ["optimizer.lr=-1"], "status": "failed"}')
    assert _lines(capsys, "s") == [
        HEAD,
        RULE,
        ROW_1,
        ROW_0,
        "failed: 2 (job.json is damaged)",
        "failed: 3 (optimizer.lr=-1): no reason recorded",
        "plot: s/report.png",
    ]


@pytest.mark.parametrize(
    "name, magic",
    [("x.png", b"\x89PNG"), ("x.PNG", b"\x89PNG"), ("x.pdf", b"%PDF"), ("x.svg", b"<?xml"), ("x.jpg", b"\xff\xd8")],
)
def test_output_with_a_format_extension_uses_that_format(here, capsys, name, magic):
    _sweep(here / "s")
    assert _lines(capsys, "s", "--output", f"out/{name}")[-1] == f"plot: out/{name}"
    assert (here / "out" / name).read_bytes().startswith(magic)
    assert [p.name for p in (here / "out").iterdir() if p.name != RECORD] == [name]  # no temporary file left


@pytest.mark.parametrize("name", ["x.txt", "report", "x.weird", "x.", ".png"])
def test_output_with_any_other_name_is_png_in_exactly_that_file(here, capsys, name):
    _sweep(here / "s")
    assert _lines(capsys, "s", "--output", f"out/{name}")[-1] == f"plot: out/{name} (PNG)"
    assert (here / "out" / name).read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in (here / "out").iterdir() if p.name != RECORD] == [name]


def _read_only(d: Path, monkeypatch) -> None:
    """d refuses new entries (EACCES), as a chmod 555 directory does for anyone but root."""
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o555)
    if not os.access(d, os.W_OK):
        return
    real_open, real_mkdir, locked = builtins.open, os.mkdir, d.resolve()

    def refuse(p):
        if locked in Path(p).resolve().parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))

    def guarded_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(p, *args, **kwargs):
        refuse(p)
        return real_mkdir(p, *args, **kwargs)

    real_os_open = os.open

    def guarded_os_open(p, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            refuse(p)
        return real_os_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "open", guarded_os_open)


def test_a_plot_that_cannot_be_written_is_skipped_after_the_table(here, capsys, monkeypatch):
    _sweep(here / "s")
    (here / "file").write_text("in the way\n")
    (here / "dir").mkdir()
    _read_only(here / "ro", monkeypatch)
    try:
        for output, line in [
            (
                "ro/report.png",
                "plot: skipped (cannot write ro/.carlos-files (Permission denied); choose a writable --output)",
            ),
            ("ro/new/report.png", "plot: skipped (ro/new/report.png: Permission denied)"),
            ("file/report.png", "plot: skipped (file is a file, not a folder)"),
            ("file/deeper/report.png", "plot: skipped (file is a file, not a folder)"),
            ("dir", "plot: skipped (dir is a directory)"),
            (".", "plot: skipped (. is a directory)"),
        ]:
            assert _lines(capsys, "s", "--output", output) == [HEAD, RULE, ROW_1, ROW_0, line]
    finally:
        (here / "ro").chmod(0o755)
    assert sorted(p.name for p in here.iterdir()) == ["dir", "file", "ro", "s"]
    assert list((here / "ro").iterdir()) == [] and list((here / "dir").iterdir()) == []


def test_a_full_disk_keeps_the_old_plot_and_leaves_no_partial_file(here, capsys, monkeypatch):
    from matplotlib.figure import Figure

    _sweep(here / "s")
    _lines(capsys, "s")  # the plot of an earlier report
    old = (here / "s" / "report.png").read_bytes()

    def savefig(self, f, *args, **kwargs):
        f.write(b"\x89PNG half a plot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", savefig)
    lines = _lines(capsys, "s")
    assert lines == [HEAD, RULE, ROW_1, ROW_0, NO_SPACE]
    assert (here / "s" / "report.png").read_bytes() == old
    assert sorted(p.name for p in (here / "s").iterdir()) == [RECORD, "0", "1", "report.png"]


NO_SPACE = (
    "plot: skipped (cannot write s/report.png (No space left on device); free some space or choose another --output)"
)


def test_report_never_replaces_a_file_it_did_not_write(here, capsys):
    _sweep(here / "s")
    (here / "s" / "report.png").write_bytes(b"the user's own picture")
    (here / "notes.txt").write_text("notes\n")
    for output, path in [
        (None, "s/report.png"),
        ("notes.txt", "notes.txt"),
        ("s/0/metrics.jsonl", "s/0/metrics.jsonl"),
    ]:
        lines = _lines(capsys, "s", *(["--output", output] if output else []))
        assert lines[-1] == f"plot: skipped ({path} exists and carlos report did not write it; pass another --output)"
    assert (here / "s" / "report.png").read_bytes() == b"the user's own picture"
    assert (here / "notes.txt").read_text() == "notes\n"


def test_report_returns_no_plot_path_when_the_plot_is_skipped(here, capsys):
    _sweep(here / "s")
    (here / "dir").mkdir()
    text, png = report(here / "s", here / "dir")
    assert text.splitlines()[0] == HEAD and png is None


def test_no_readable_run_is_refused_naming_why(here, capsys):
    _metrics(here / "only", "[1]", "2")
    assert _refusal(capsys, "only") == (
        "carlos: error: no readable runs under only: only (no readable record in metrics.jsonl, 2 damaged lines)"
    )
    (here / "s" / "0").mkdir(parents=True)
    (here / "s" / "0" / "metrics.jsonl").write_bytes(b"\xff")
    assert _refusal(capsys, "s") == "carlos: error: no readable runs under s: 0 (metrics.jsonl is not UTF-8 text)"
    for i in range(1, 5):
        _metrics(here / "s" / str(i), "null")
    assert _refusal(capsys, "s") == (
        "carlos: error: no readable runs under s: 0 (metrics.jsonl is not UTF-8 text), "
        "1 (no readable record in metrics.jsonl, 1 damaged line), "
        "2 (no readable record in metrics.jsonl, 1 damaged line) and 2 more"
    )
    assert not (here / "s" / "report.png").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_in_place_of_a_file_is_skipped_without_blocking(here, capsys):
    _sweep(here / "s")
    (here / "s" / "1" / "metrics.jsonl").unlink()
    os.mkfifo(here / "s" / "1" / "metrics.jsonl")
    lines = _lines(capsys, "s")
    assert "skipped: 1 (metrics.jsonl cannot be read: it is a FIFO (named pipe))" in lines


def test_without_matplotlib_the_table_is_printed_and_the_plot_skipped(here, capsys, monkeypatch):
    """matplotlib is an extra ([plot]): without it, report prints its table and says how to get the plot."""
    _sweep(here / "s")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = _lines(capsys, "s")
    assert lines == [
        HEAD,
        RULE,
        ROW_1,
        ROW_0,
        "plot: skipped (matplotlib is not installed; pip install 'carlos[plot]')",
    ]
    assert not (here / "s" / "report.png").exists()


def test_the_plot_of_one_run_shows_its_train_and_validation_curves(here, capsys):
    from matplotlib.figure import Figure

    from carlos.report import _figure, read_runs

    _sweep(here / "s")
    runs, _ = read_runs(here / "s" / "0")
    figure: Figure = _figure(runs)
    curves = figure.axes[0].lines
    assert len(curves) == 2  # validation (dots) and train (faint), in the run's colour
    assert curves[0].get_color() == curves[1].get_color() and curves[1].get_alpha() < 1
    assert list(curves[1].get_ydata()) == pytest.approx([2.0 / math.log(2)])  # nats -> bits


def test_a_run_whose_path_is_not_utf8_is_shown_with_replacement_characters_beside_the_others(here, capsys):
    from carlos.report import _figure, read_runs

    _sweep(here / "s")
    _run(here / "s" / os.fsdecode(b"odd\xff"), 0.002, 64, [2.7])  # a byte a file system holds, UTF-8 cannot spell
    odd = "| odd\ufffd | 0.002 | 0.002 | 10 | 100 | 2.7000 | 1,000 |"
    assert _lines(capsys, "s") == [HEAD, RULE, ROW_1, ROW_0, odd, "plot: s/report.png"]
    assert (here / "s" / "report.png").read_bytes()[:4] == b"\x89PNG"
    legend = _figure(read_runs(here / "s")[0]).axes[1].get_legend()
    labels = ["0 (lr=0.001, scaled=0.001)", "1 (lr=0.003, scaled=0.003)", "odd\ufffd (lr=0.002, scaled=0.002)"]
    assert [t.get_text() for t in legend.get_texts()] == labels


def _composed_run(d: Path, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    from carlos.compose import compose

    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose("train", overrides)))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 100, "val_bpb": 2.5}) + "\n")


def test_a_group_whose_settings_are_exactly_one_preset_is_shown_by_its_name(tmp_path):
    _composed_run(tmp_path / "a", ["model=baseline", "optimizer=adamw"])
    _composed_run(tmp_path / "b", ["model=modern", "optimizer=adamw"])
    assert differing(find_runs(tmp_path)) == ["model"]  # not model.bias, model.d_ff, model.mlp, model.norm
    assert "| b | modern | 10 |" in report(tmp_path)[0]
    _composed_run(tmp_path / "c", ["model=modern", "model.d_ff=128", "optimizer=adamw", "optimizer.lr=1e-3"])
    keys = differing(find_runs(tmp_path))  # c's model is no preset: every run's settings are shown one by one
    assert {"model.d_ff", "model.bias", "optimizer.lr"} <= set(keys) and not {"model", "optimizer"} & set(keys)
