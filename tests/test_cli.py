"""The commands as a user runs them: the console script and scripts/, in a temporary directory."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import TINY_MODEL, copy_trained, make_corpus

ROOT = Path(__file__).resolve().parents[1]
CARLOS = str(Path(sys.executable).parent / "carlos")
TINY = [
    "--max_steps",
    "12",
    "--grad_accum_steps",
    "2",
    "--eval_interval",
    "6",
    "--ckpt_interval",
    "4",
    "--log_interval",
    "3",
    "--sample_tokens",
    "16",
    "--warmup_steps",
    "2",
]


def run(args, cwd, env=None, check=True):
    e = {**os.environ, "WANDB_MODE": "", "WANDB_PROJECT": "", **(env or {})}
    e = {k: v for k, v in e.items() if v != ""}
    p = subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """prepare and train once through the console script; the tests below read what it wrote."""
    cwd = tmp_path_factory.mktemp("cli")
    make_corpus(cwd / "corpus.txt")
    run([CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], cwd)
    out = run([CARLOS, "train", "--workdir", "w", *TINY], cwd)
    return cwd, out


# one real run of each command through the console script, on a copy of the session's trained fixture:
# (arguments, a file it writes, a word of what it prints); in `make test` although each takes seconds
EACH = {
    "prepare": (["corpus.txt", "--workdir", "p", "--seq_len", "32"], "p/splits.json", "prepared p: train"),
    "train": (
        ["--workdir", "w", "--run", "s", *TINY_MODEL, "--max_steps", "2", "--micro_batch_size", "4"],
        "w/runs/s/checkpoints/last.pt",
        "done: 2 steps",
    ),
    "eval": (["--workdir", "w", "--split", "test"], None, "bits-per-byte: "),
    "sample": (["--workdir", "w", "--max_new_tokens", "8", "--seed", "3"], None, ""),
    "export": (["--workdir", "w", "--out", "e"], "e/model.safetensors", "as safetensors to e"),
    "report": (["w"], "w/report.png", "| w |"),
    "bench": (["--input", "corpus.txt", "--workdir", "b", "output=null", "rounds=0"], "b/same_shape/splits.json", ""),
}


@pytest.mark.parametrize("command", EACH)
def test_each_command_runs_through_the_console_script(command, trained, tmp_path):
    args, writes, says = EACH[command]
    copy_trained(trained, tmp_path)
    before = set(tmp_path.rglob("*"))
    p = run([CARLOS, command, *args], tmp_path, env={"WANDB_MODE": "disabled"})
    assert says in p.stdout and p.stderr.strip() == "", (p.stdout, p.stderr)
    if writes is not None:
        assert (tmp_path / writes).is_file()
    else:
        assert set(tmp_path.rglob("*")) == before  # eval and sample only read
    if command == "sample":
        assert len(p.stdout.encode()) >= 8  # 8 new tokens (bytes; one the decoder cannot read shows as 3)


@pytest.mark.slow
def test_prepare_train_eval_sample_end_to_end(scripted):
    cwd, out = scripted
    w = cwd / "w"
    assert "parameters" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("done: 12 steps")
    assert sorted(p.name for p in (w / "checkpoints").iterdir()) == [
        "best.pt",
        "last.pt",
        "step_000004.pt",
        "step_000008.pt",
        "step_000012.pt",
    ]
    assert sorted(p.name for p in (w / "samples").iterdir()) == ["step_000006.txt", "step_000012.txt"]
    assert sorted(p.name for p in (w / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    steps = [json.loads(line)["step"] for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 6, 9, 12, 12]
    # nothing in the current directory but what the user asked for
    assert sorted(p.name for p in cwd.iterdir()) == ["corpus.txt", "w"]

    ev = run([CARLOS, "eval", "--workdir", "w", "--checkpoint", "best", "--split", "test", "--json"], cwd)
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert set(result) >= {"split", "loss", "perplexity", "bpb", "tokens"} and result["split"] == "test"
    info = json.loads((w / "splits.json").read_text())
    assert result["tokens"] == info["tokens"]["test"] - 1
    assert result["bpb"] == pytest.approx(result["loss"] / 0.6931471805599453)
    assert "perplexity" in ev.stdout and "bits-per-byte" in ev.stdout
    # scripts/ run the same app
    ev2 = run(
        [
            sys.executable,
            str(ROOT / "scripts" / "eval.py"),
            "--workdir",
            "w",
            "--split",
            "test",
            "--checkpoint",
            "best",
            "--json",
        ],
        cwd,
    )
    assert json.loads(ev2.stdout.strip().splitlines()[-1]) == result

    # --stride: sliding windows beside the standard pass, which stays as it was
    evaluate = [CARLOS, "eval", "--workdir", "w", "--checkpoint", "best", "--split", "test", "--json"]
    same = json.loads(run([*evaluate, "--stride", "32"], cwd).stdout.strip().splitlines()[-1])
    assert {k: v for k, v in same.items() if k != "sliding"} == {k: v for k, v in result.items() if k != "sliding"}
    # a window every seq_len tokens is the standard pass itself
    assert same["sliding"] == {"stride": 32, "context": 32, "loss": result["loss"], "bpb": result["bpb"]}
    dense = run([*evaluate, "--stride", "4"], cwd)
    sliding = json.loads(dense.stdout.strip().splitlines()[-1])["sliding"]
    assert sliding["stride"] == 4 and sliding["bpb"] != result["bpb"]
    assert f"sliding windows (stride 4, up to 32 tokens of context): loss {sliding['loss']:.4f}" in dense.stdout
    refused = subprocess.run([*evaluate, "--stride", "33"], cwd=cwd, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr == (
        "carlos: error: --stride 33 is beyond the model's context of 32; use 32 or less\n"
    )

    prompt = "It's a, b ${x} C:\\dir\\"
    s1 = run(
        [CARLOS, "sample", "--workdir", "w", "--prompt", prompt, "--max_new_tokens", "20", "--temperature", "0"], cwd
    )
    s2 = run(
        [
            sys.executable,
            str(ROOT / "scripts" / "sample.py"),
            "checkpoint=last",
            "--prompt",
            prompt,
            "max_new_tokens=20",
            "temperature=0",
            "workdir=w",
        ],
        cwd,
    )
    assert s1.stdout.startswith(prompt) and len(s1.stdout.encode()) > len(prompt)
    s3 = run(
        [
            CARLOS,
            "sample",
            "--workdir",
            "w",
            "--checkpoint",
            "last",
            "--prompt",
            prompt,
            "--max_new_tokens",
            "20",
            "--temperature",
            "0",
        ],
        cwd,
    )
    assert s2.stdout == s3.stdout  # greedy is deterministic; both spellings agree
    assert sorted(p.name for p in cwd.iterdir()) == ["corpus.txt", "w"]


@pytest.mark.slow
def test_resume_and_refusal_through_the_cli(scripted):
    cwd, _ = scripted
    refused = run([CARLOS, "train", "--workdir", "w", *TINY], cwd, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    run([CARLOS, "train", "--workdir", "w", *TINY[2:], "--max_steps", "15", "--resume"], cwd)
    steps = [json.loads(line)["step"] for line in (cwd / "w" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 6, 9, 12, 12, 15, 15]


# every refusal is in tests/test_errors.py (in-process); these few go through the console script itself
ERRORS = [
    (["prepare", "--input", "missing.txt"], "does not exist"),
    (["train", "--workdir", "nowhere"], "not prepared"),
    (["train", "model=basline"], "did you mean 'baseline'"),
    (["trian"], "did you mean 'train'"),
]


@pytest.mark.parametrize("args, message", ERRORS)
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, args, message):
    p = run([CARLOS, *args], tmp_path, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("carlos: error: ") and message in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_carlos_debug_shows_the_traceback(tmp_path):
    p = run([CARLOS, "prepare", "--input", "missing.txt"], tmp_path, env={"CARLOS_DEBUG": "1"}, check=False)
    assert p.returncode == 2 and "Traceback" in p.stderr


def test_help_and_cfg_job(tmp_path):
    assert "prepare" in run([CARLOS, "--help"], tmp_path).stdout
    h = run([CARLOS, "train", "--help"], tmp_path).stdout
    assert "--grad_accum_steps" in h and "model: baseline (default), medium, modern" in h
    cfg = run(
        [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            "model=baseline",
            "trainer.precision=bf16-mixed",
            "--cfg",
            "job",
        ],
        tmp_path,
    ).stdout
    assert "precision: bf16-mixed" in cfg and "d_model: 64" in cfg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_wandb_offline_from_dotenv_and_disabled_wins(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    run([CARLOS, "prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"], tmp_path)
    (tmp_path / ".env").write_text("WANDB_PROJECT=carlos-test\nWANDB_MODE=offline\n")
    run(
        [
            CARLOS,
            "train",
            "--workdir",
            "w",
            *TINY,
            "--max_steps",
            "6",
            "--wandb_run_name",
            "t1",
            "--wandb_tags",
            "baseline",
            "byte-level",
        ],
        tmp_path,
        env={"WANDB_SILENT": "true"},
    )
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    # W&B's own log of the run's settings, written by wandb.init itself (the .wandb file comes from W&B's
    # background service, whose timing under a loaded CI machine is W&B's, not carlos's)
    debug = (runs[0] / "logs" / "debug.log").read_text() if len(runs) == 1 else ""
    assert "carlos-test" in debug and "'t1'" in debug
    run(
        [CARLOS, "train", "--workdir", "w", *TINY, "--max_steps", "6", "--overwrite", "--wandb_mode", "disabled"],
        tmp_path,
    )
    assert not (tmp_path / "w" / "wandb").exists()


@pytest.mark.slow
def test_wandb_is_not_imported_without_a_project(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    code = (
        "import sys; from carlos.cli import main\n"
        "main(['prepare', '--input', 'corpus.txt', '--workdir', 'w', '--seq_len', '32'])\n"
        f"main(['train', '--workdir', 'w', *{TINY!r}, '--max_steps', '3'])\n"
        "print('WANDB_IMPORTED', 'wandb' in sys.modules)\n"
    )
    p = run([sys.executable, "-c", code], tmp_path)
    assert "WANDB_IMPORTED False" in p.stdout


@pytest.mark.slow
def test_wheel_carries_the_configs(tmp_path):
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        ROOT,
    )
    wheel = next(tmp_path.glob("carlos-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in (
        "carlos/conf/train.yaml",
        "carlos/conf/prepare.yaml",
        "carlos/conf/eval.yaml",
        "carlos/conf/sample.yaml",
        "carlos/conf/model/baseline.yaml",
        "carlos/conf/optimizer/adamw.yaml",
        "carlos/conf/schedule/cosine.yaml",
        "carlos/conf/precision/auto.yaml",
        "carlos/cli.py",
    ):
        assert name in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from carlos.compose import conf_dir; print(conf_dir())"
    p = run([sys.executable, "-c", code], tmp_path, env={"PYTHONPATH": str(site)})
    assert p.stdout.strip() == str(site / "carlos" / "conf")
    p = run(
        [sys.executable, "-m", "carlos", "train", "model=medium", "--cfg", "job"],
        tmp_path,
        env={"PYTHONPATH": str(site)},
    )
    assert "d_model: 128" in p.stdout


# carlos called as a library, then SIGTERM: the process must end as any Python process does (-15), not raise
# carlos's Stopped in whatever code runs next
AFTER_MAIN = """
import os, signal, sys
from carlos.cli import main
from carlos.errors import STOP_SIGNALS
before = [signal.getsignal(s) for s in STOP_SIGNALS]
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit as e:
        print('exit', e.code, flush=True)
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == before, argv
print('handlers as before', flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print('SIGTERM did not end the process', flush=True)
"""


def test_carlos_as_a_library_gives_the_stop_signals_back(tmp_path, capsys):
    import signal

    from carlos.errors import STOP_SIGNALS

    from .conftest import run_cli

    before = [signal.getsignal(s) for s in STOP_SIGNALS]
    assert run_cli(["eval", "--help"], capsys)[0] == 0
    assert run_cli(["train", "--peak_lrr", "1"], capsys)[0] == 2
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == before


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_ends_the_process_after_carlos_main_returns(tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    argvs = [
        ["eval", "--help"],
        ["train", "--peak_lrr", "1"],  # refused: SystemExit(2)
        ["prepare", "--input", "corpus.txt", "--workdir", "w", "--seq_len", "32"],
        ["train", "--workdir", "w", *TINY, "--max_steps", "2"],  # train releases the handlers midway
    ]
    p = run([sys.executable, "-c", AFTER_MAIN.format(argvs=argvs)], tmp_path, check=False)
    assert p.returncode == -15, (p.returncode, p.stdout, p.stderr)
    assert "exit 2\n" in p.stdout and p.stdout.endswith("handlers as before\n"), p.stdout


def test_a_workdir_named_with_bytes_that_are_not_utf8_prints_as_those_bytes_on_a_strict_stdout(tmp_path, monkeypatch):
    import io

    from carlos.cli import main

    make_corpus(tmp_path / "corpus.txt")
    odd = tmp_path / os.fsdecode(b"w\xff")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)  # most locales'
    monkeypatch.setattr(sys, "stdout", out)
    with pytest.raises(SystemExit) as done:
        main(["prepare", "--input", str(tmp_path / "corpus.txt"), "--workdir", str(odd), "--seq_len", "32"])
        raise SystemExit(0)
    assert done.value.code == 0 and (odd / "splits.json").is_file()
    assert out.buffer.getvalue().startswith(b"prepared " + os.fsencode(odd) + b": train ")  # as ls shows it
    assert out.errors == "strict"  # given back when the command ended


def test_a_number_given_to_a_flag_whose_default_is_auto_is_a_number():
    from carlos.cli import translate
    from carlos.compose import compose
    from carlos.config import config_keys

    defaults = config_keys(compose("train", []))
    args = ["--weight_decay", "0.1", "--eval_interval", "5", "--eval_tokens", "auto", "--run", "7"]
    _, overrides = translate("train", args, defaults)
    assert overrides == ["optimizer.weight_decay=0.1", "eval_interval=5", "eval_tokens='auto'", "run='7'"]
