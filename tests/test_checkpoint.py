"""A checkpoint read by `carlos eval` and `carlos sample` never ends in a traceback: a damaged structure,
settings that do not match the weights, NaN weights, a device this machine lacks, a checkpoint name that
is not a file or a hostile pickle are each refused in one line, exit code 2. Each damaged checkpoint is a
mutated copy of a tiny real one, trained once for the module."""

from __future__ import annotations

import builtins
import copy
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint
from carlos.cli import main
from carlos.errors import CarlosError
from carlos.generate import filter_logits, generate

from .conftest import copy_trained


@pytest.fixture(scope="module")
def root(trained, tmp_path_factory) -> Path:
    """corpus.txt and w: prepared with seq_len 32, trained 4 steps (step_000002, step_000004, best, last)
    with a learned position table, which several of the damaged-checkpoint cases below change."""
    return copy_trained(trained, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def good(root: Path) -> dict:
    return load_checkpoint(root / "w" / "checkpoints" / "best.pt")


@pytest.fixture
def carlos(root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> Callable:
    """carlos(*argv) -> (exit code, stdout, stderr), run in-process in root."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("CARLOS_DEBUG", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = 0
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def refused(carlos: Callable, argv: list[str], expect: str) -> str:
    """Runs argv, asserts a one-line refusal holding `expect`, and returns that line."""
    code, _, err = carlos(*argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("carlos: error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    return lines[0]


def both(carlos: Callable, checkpoint: str | Path, expect: str, *extra: str) -> list[str]:
    """The same refusal from eval and from sample."""
    return [
        refused(carlos, ["eval", "--workdir", "w", "--checkpoint", str(checkpoint), *extra], expect),
        refused(carlos, ["sample", "--workdir", "w", "--checkpoint", str(checkpoint), *extra], expect),
    ]


def workdir_copy(root: Path, dest: Path) -> Path:
    """A copy of the prepared workdir w with an empty checkpoints directory."""
    shutil.copytree(root / "w", dest, ignore=shutil.ignore_patterns("checkpoints"))
    (dest / "checkpoints").mkdir()
    return dest


def mutated(good: dict, path: Path, change: Callable) -> Path:
    ckpt = copy.deepcopy(good)
    change(ckpt)
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------- damaged structure


def setting(key: str, value) -> Callable:
    return lambda c: c["carlos"]["model"].__setitem__(key, value)


def no_seq_len(change: Callable) -> Callable:
    """change, with the seq_len that would otherwise be refused first removed."""
    return lambda c: (change(c), c["carlos"].pop("seq_len"))


def entry(key, value) -> Callable:
    return lambda c: c["state_dict"].__setitem__(key, value)


def weight(key: str, change: Callable) -> Callable:
    return lambda c: c["state_dict"].__setitem__(key, change(c["state_dict"][key]))


def pop(*keys: str) -> Callable:
    def change(c: dict) -> None:
        d = c
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return change


def rope(c: dict) -> None:
    c["carlos"]["model"].update(pos="rope", block_size=10**12)
    del c["carlos"]["seq_len"]
    del c["state_dict"]["model.pos_emb.weight"]


DAMAGED = {
    # the metadata
    "carlos-string": (lambda c: c.__setitem__("carlos", "metadata"), "carlos metadata is a str, not a dict"),
    "carlos-list": (lambda c: c.__setitem__("carlos", [1, 2]), "carlos metadata is a list, not a dict"),
    # the model settings
    "model-missing": (pop("carlos", "model"), "model settings are missing"),
    "model-string": (lambda c: c["carlos"].__setitem__("model", "gpt"), "model settings are str, not a dict"),
    "model-missing-key": (pop("carlos", "model", "n_heads"), "model settings lack n_heads"),
    "model-extra-key": (setting("n_experts", 8), "model settings have unknown 'n_experts'"),
    "d_model-changed": (setting("d_model", 64), "describe"),
    "d_model-changed-a-little": (setting("d_model", 40), "model.tok_emb.weight has shape (256, 32)"),
    "d_ff-changed": (setting("d_ff", 128), "model.blocks.0.mlp.fc.weight has shape (64, 32)"),
    "n_layers-changed": (setting("n_layers", 2), "say n_layers=2 but its weights hold 1 layer"),
    "n_layers-1e6": (setting("n_layers", 10**6), "say n_layers=1000000 but its weights hold 1 layer"),
    "block_size-changed": (setting("block_size", 64), "trained with seq_len=32 but model.block_size=64"),
    "block_size-1e9": (
        no_seq_len(setting("block_size", 10**9)),
        "describe 32,000,024,992 parameters but its weights hold 26,016",
    ),
    "block_size-1e9-rope": (rope, "needs at least about"),
    "rope-beyond-int64": (
        no_seq_len(lambda c: c["carlos"]["model"].update(pos="rope", block_size=10**30)),
        "cannot be built",
    ),
    "mlp-changed": (setting("mlp", "swiglu"), "model.blocks.0.mlp.fc.weight has shape (64, 32)"),
    "pos-changed": (no_seq_len(setting("pos", "rope")), "unexpected 'model.pos_emb.weight'"),
    "bool-for-int": (setting("n_layers", True), "model.n_layers is True (bool), not int"),
    "str-for-int": (setting("d_model", "32"), "model.d_model is '32' (str), not int"),
    "float-for-int": (setting("d_model", 32.0), "model.d_model is 32.0 (float), not int"),
    "int-for-bool": (setting("bias", 1), "model.bias is 1 (int), not bool"),
    "none-for-str": (setting("norm", None), "model.norm is None (NoneType), not str"),
    "heads-do-not-divide": (setting("n_heads", 5), "model.n_heads=5 does not divide model.d_model=32"),
    "heads-do-not-divide-huge": (  # GPTConfig's own message would list the divisors of 10**12 one by one
        lambda c: c["carlos"]["model"].update(d_model=10**12, n_heads=7),
        "model.n_heads=7 does not divide model.d_model=1000000000000",
    ),
    "d_model-zero": (setting("d_model", 0), "model.d_model must be a positive integer"),
    "norm-unknown": (setting("norm", "batchnorm"), "model.norm must be one of"),
    "dropout-nan": (setting("dropout", float("nan")), "model.dropout must be in [0, 1)"),
    "rope_base-negative": (setting("rope_base", -1.0), "model.rope_base must be a number above 1"),
    "rope_base-inf": (setting("rope_base", float("inf")), "model.rope_base must be a number above 1"),
    # the tokenizer
    "tokenizer-missing": (pop("carlos", "tokenizer"), "tokenizer is missing"),
    "tokenizer-list": (lambda c: c["carlos"].__setitem__("tokenizer", []), "tokenizer is list, not a dict"),
    "tokenizer-bos": (
        lambda c: c["carlos"]["tokenizer"].update(add_bos=True, vocab_size=257),
        "tokenizer (add_bos=True, add_eos=False) has 257 tokens but model.vocab_size is 256",
    ),
    "tokenizer-bos-only": (
        lambda c: c["carlos"]["tokenizer"].__setitem__("add_bos", True),
        "tokenizer.vocab_size is 256 but add_bos=True, add_eos=False make 257",
    ),
    "tokenizer-eos-vocab": (
        lambda c: (c["carlos"]["tokenizer"].update(add_eos=True), c["carlos"]["tokenizer"].pop("vocab_size")),
        "tokenizer (add_bos=False, add_eos=True) has 258 tokens but model.vocab_size is 256",
    ),
    "tokenizer-eos-string": (
        lambda c: c["carlos"]["tokenizer"].__setitem__("add_eos", "yes"),
        "tokenizer.add_eos is 'yes', not true or false",
    ),
    "tokenizer-vocab": (
        lambda c: c["carlos"]["tokenizer"].__setitem__("vocab_size", 300),
        "tokenizer.vocab_size is 300 but add_bos=False, add_eos=False make 256",
    ),
    "seq_len-changed": (lambda c: c["carlos"].__setitem__("seq_len", 64), "trained with seq_len=64"),
    "seq_len-tensor": (lambda c: c["carlos"].__setitem__("seq_len", torch.zeros(3)), "trained with seq_len=tensor("),
    "tokenizer-vocab-tensor": (
        lambda c: c["carlos"]["tokenizer"].__setitem__("vocab_size", torch.zeros(3)),
        "tokenizer.vocab_size is tensor(",
    ),
    # the weights
    "state_dict-string": (lambda c: c.__setitem__("state_dict", "weights"), "state_dict is a str, not a dict"),
    "state_dict-list": (lambda c: c.__setitem__("state_dict", []), "state_dict is a list, not a dict"),
    "entry-string": (entry("model.ln_f.bias", "zeros"), "entry 'model.ln_f.bias' is a str, not a tensor"),
    "entry-none": (entry("model.blocks.0.ln1.weight", None), "is a NoneType, not a tensor"),
    "entry-list": (entry("model.tok_emb.weight", [[0.0] * 32] * 256), "is a list, not a tensor"),
    "key-not-a-name": (entry(7, torch.zeros(1)), "has a key 7 that is not a name"),
    "missing-entry": (pop("state_dict", "model.blocks.0.ln1.weight"), "lack model.blocks.0.ln1.weight"),
    "missing-head": (pop("state_dict", "model.head.weight"), "lack model.head.weight"),
    "missing-everything": (lambda c: c.__setitem__("state_dict", {}), "hold 0 layers"),
    "extra-entry": (entry("model.extra.weight", torch.zeros(3)), "unexpected 'model.extra.weight'"),
    "extra-layer": (entry("model.blocks.1.ln1.weight", torch.ones(32)), "n_layers=1 but its weights hold 2"),
    "wrong-shape": (weight("model.blocks.0.attn.qkv.weight", lambda t: t.t()), "has shape (32, 96)"),
    "wrong-shape-bias": (weight("model.ln_f.bias", lambda t: t[:31]), "model.ln_f.bias has shape (31,)"),
    "int-dtype": (weight("model.ln_f.weight", lambda t: t.long()), "holds torch.int64, not floating-point"),
    "bool-dtype": (weight("model.ln_f.bias", lambda t: t > 0), "holds torch.bool"),
    "complex-dtype": (weight("model.ln_f.bias", lambda t: t.to(torch.complex64)), "holds torch.complex64"),
    "meta-tensor": (weight("model.ln_f.bias", lambda t: t.to("meta")), "meta tensor, not weights"),
    "sparse-tensor": (weight("model.ln_f.bias", lambda t: t.to_sparse()), "sparse_coo"),
    "head-untied": (weight("model.head.weight", lambda t: t + 1), "model.head.weight differs"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_a_damaged_checkpoint_is_refused_by_eval_and_sample(name, good, carlos, tmp_path) -> None:
    change, expect = DAMAGED[name]
    path = mutated(good, tmp_path / "damaged.pt", change)
    for line in both(carlos, path, expect):
        assert str(path) in line
        if "needs at least about" not in line:
            assert "is damaged: " in line and line.endswith("; use another checkpoint"), line


def test_the_trained_checkpoint_itself_passes(carlos) -> None:
    code, out, err = carlos("eval", "--workdir", "w", "--checkpoint", "best")
    assert code == 0 and "bits-per-byte" in out, err
    code, out, err = carlos("sample", "--workdir", "w", "--max_new_tokens", "8", "--prompt", "The")
    assert code == 0 and out.startswith("The"), err


def test_a_model_too_big_for_the_memory_left_is_refused_before_it_is_built(carlos, monkeypatch) -> None:
    monkeypatch.setattr("carlos.memory.host_available", lambda: 10_000)
    line = refused(carlos, ["eval", "--workdir", "w", "--device", "cpu"], "in batches of 28 x 32 needs at least")
    assert line.endswith("lower --batch_size, or use another --device")
    line = refused(carlos, ["sample", "--workdir", "w", "--device", "cpu"], "context 32) needs at least about")
    assert "this machine has 0.0 MB available" in line


def test_a_torch_archive_that_is_not_a_checkpoint_inside_is_corrupt(carlos, tmp_path) -> None:
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle at all")
    both(carlos, tmp_path / "archive.pt", "is truncated or corrupt")


def test_an_unreadable_checkpoint_says_so(carlos, monkeypatch) -> None:
    real = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith("best.pt"):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr("carlos.checkpoint.open", guarded, raising=False)
    both(carlos, "best", "cannot be read (Permission denied); check its permissions")


# ---------------------------------------------------------------- NaN and inf weights


@pytest.mark.parametrize(
    "change",
    [
        weight("model.blocks.0.attn.qkv.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
        weight("model.ln_f.bias", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
        weight("model.pos_emb.weight", lambda t: t * float("-inf")),
    ],
    ids=["nan", "inf", "all-minus-inf"],
)
def test_nan_or_inf_weights_are_refused(change, good, carlos, tmp_path) -> None:
    path = mutated(good, tmp_path / "diverged.pt", change)
    for line in both(carlos, path, "holds NaN or inf weights (the run diverged); use an earlier checkpoint"):
        assert line.endswith("e.g. --checkpoint <a step>")  # none beside it


def test_nan_weights_in_best_name_the_step_before(good, carlos, root, tmp_path) -> None:
    run = workdir_copy(root, tmp_path / "run")
    for name in ("step_000002.pt", "step_000004.pt"):
        (run / "checkpoints" / name).write_bytes((root / "w" / "checkpoints" / name).read_bytes())
    nan = lambda c: c["state_dict"]["model.tok_emb.weight"].fill_(float("nan"))  # noqa: E731 - tied: head too
    mutated(good, run / "checkpoints" / "best.pt", nan)
    for line in both(carlos, "best", "use an earlier checkpoint, e.g. --checkpoint 2", "--workdir", str(run)):
        assert "holds NaN or inf weights (the run diverged)" in line


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(
    "device, expect",
    [
        # cuda and gpu0: tests/test_errors.py (device-no-cuda, device), whose messages docs/ERRORS.md shows
        ("cuda:0", "--device cuda:0: this machine has no CUDA GPU (torch sees none); use --device cpu or auto"),
        ("mps", "--device mps: this machine has no Apple GPU (MPS); use --device cpu or auto"),
        ("meta", "--device meta: carlos runs on cpu, cuda or mps, not meta"),
        ("xpu", "not xpu"),
        ("hpu:0", "not hpu"),
        ("CUDA", "is not a torch device"),
        ("cuda:-1", "is not a torch device"),
    ],
)
def test_a_device_this_machine_lacks_is_refused(device, expect, carlos, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    both(carlos, "best", expect, "--device", device)


def test_a_cuda_index_beyond_the_gpus_is_refused(carlos, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    both(carlos, "best", "--device cuda:2: this machine has 2 CUDA GPUs (cuda:0 to cuda:1)", "--device", "cuda:2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    both(carlos, "best", "--device cuda:1: this machine has 1 CUDA GPU (cuda:0); use one of them", "--device", "cuda:1")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_are_accepted(device, carlos, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = carlos("eval", "--workdir", "w", "--device", device)
    assert code == 0 and "bits-per-byte" in out, err


# ---------------------------------------------------------------- tiny temperatures


def test_a_tiny_temperature_is_greedy(good, root, carlos) -> None:
    from carlos.checkpoint import model_from_checkpoint

    model, _ = model_from_checkpoint(good, root / "w" / "checkpoints" / "best.pt")
    greedy = generate(model, [10], 40, temperature=0)  # 40 > context 32: the window slides
    for temperature in (1e-300, 5e-324, 1e-46):  # 0 in float32; the smallest float64; a float32 denormal
        g = torch.Generator().manual_seed(0)
        assert generate(model, [10], 40, temperature, 50, 0.9, g) == greedy, temperature
        assert generate(model, [10], 40, temperature, 0, 1.0, g) == greedy, temperature
    sample = ["sample", "--workdir", "w", "--max_new_tokens", "40", "--temperature"]
    code, out, err = carlos(*sample, "1e-300")
    assert code == 0, err
    assert out == carlos(*sample, "0")[1]


def test_filtering_with_a_tiny_temperature_is_finite_and_normal_ones_unchanged() -> None:
    logits = torch.randn(3, 258, generator=torch.Generator().manual_seed(1))
    for top_k, top_p in ((0, 1.0), (50, 0.9), (1, 0.5)):
        out = filter_logits(logits, 1e-300, top_k, top_p)
        assert not out.isnan().any()
        best = out.max(dim=-1)
        assert (best.values == 0).all() and (best.indices == logits.argmax(dim=-1)).all()
        assert (torch.isinf(out).sum(dim=-1) == 257).all()  # every other token is out
    for t in (0.8, 1.0, 1.7, 1e-3):  # the float32 path as before: bit for bit
        expect = (logits - logits.max(dim=-1, keepdim=True).values) / t
        assert torch.equal(filter_logits(logits, t, 0, 1.0), expect)


def test_top_p_among_tied_logits_keeps_the_greedy_token() -> None:
    logits = torch.zeros(17)  # all tied: a sort that is not stable could drop index 0, argmax's choice
    kept = filter_logits(logits, 1.0, 0, 0.5)
    assert torch.isfinite(kept[: int(torch.isfinite(kept).sum())]).all() and torch.isfinite(kept[0])


# ---------------------------------------------------------------- names that are not checkpoint files


def test_best_pt_a_directory_is_named_as_one(carlos, tmp_path, root) -> None:
    run = workdir_copy(root, tmp_path / "run")
    (run / "checkpoints" / "best.pt").mkdir()
    (run / "checkpoints" / "junk.pt").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes((root / "w" / "checkpoints" / "last.pt").read_bytes())
    for line in both(carlos, "best", "best.pt is a directory, not a checkpoint file", "--workdir", str(run)):
        assert line.endswith("; available: last")  # neither directory


def test_symlinks_that_lead_nowhere_are_named(carlos, tmp_path, root) -> None:
    ckpts = workdir_copy(root, tmp_path / "run") / "checkpoints"
    (ckpts / "best.pt").symlink_to(ckpts / "gone.pt")
    (ckpts / "a.pt").symlink_to(ckpts / "b.pt")
    (ckpts / "b.pt").symlink_to(ckpts / "a.pt")
    (ckpts / "last.pt").symlink_to(root / "w" / "checkpoints" / "last.pt")  # a good one, through a link
    run = ["--workdir", str(tmp_path / "run")]
    both(carlos, "best", f"best.pt is a symlink to {ckpts / 'gone.pt'}, which does not exist; available: last", *run)
    both(carlos, ckpts / "a.pt", "a.pt is a symlink loop (a link that leads back to itself); available: last", *run)
    assert carlos("eval", *run, "--checkpoint", "last")[0] == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_a_named_pipe_is_not_read(carlos, tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe.pt")  # reading it would wait forever for a writer
    both(carlos, tmp_path / "pipe.pt", "pipe.pt is a FIFO (named pipe), not a checkpoint file")


# ---------------------------------------------------------------- hostile pickles


class Evil:
    """Unpickling it calls func(*args)."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class Custom:
    """A class of this test module: not among the types the safe loader allows."""


def test_a_hostile_checkpoint_never_advises_weights_only_false(carlos, tmp_path) -> None:
    marker = tmp_path / "PWNED"
    payloads = {
        "os-system": Evil(os.system, f"touch {marker}"),
        "eval": Evil(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "exec": Evil(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "popen": Evil(subprocess.Popen, ["touch", str(marker)]),
        "path-touch": Evil(Path.touch, marker),
        "custom-class": Custom(),
    }
    for name, payload in payloads.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": {}, "carlos": {"model": payload}}, path)
        with pytest.raises(CarlosError) as e:
            load_checkpoint(path)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert "GLOBAL" in str(e.value), str(e.value)  # it names what it refused
        for line in both(carlos, path, "was refused by the safe loader ("):
            assert "weights_only" not in line and "safe_globals" not in line, line
        assert not marker.exists(), name
