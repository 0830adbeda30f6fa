from pathlib import Path

import pytest

from carlos.cli import SCRIPT_FLAGS, flag_keys, hydra_quote, translate
from carlos.compose import compose, conf_dir, validate
from carlos.config import EvalConfig, GenerateConfig, PrepareConfig, TrainConfig, config_keys, decode_escapes, parse
from carlos.errors import CarlosError
from carlos.optimization import build_optimizer, build_schedule

GROUPS = {
    g: sorted(p.stem for p in (conf_dir() / g).glob("*.yaml"))
    for g in ("model", "optimizer", "schedule", "precision", "experiment")
}


def test_groups_have_real_choices():
    assert GROUPS == {
        "model": ["baseline", "medium", "modern"],
        "optimizer": ["adamw", "muon", "sgd"],
        "schedule": ["constant", "cosine", "wsd"],
        "precision": ["auto", "bf16", "fp16", "fp32"],
        "experiment": ["cpu_10min", "gpu"],
    }


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    tc = parse(compose("train", [f"{group}={option}"]), TrainConfig)
    optimizer = {**tc.optimizer}
    if optimizer.get("weight_decay") == "auto":  # the run sets it from regularization: (test_train)
        optimizer["weight_decay"] = tc.regularization.weight_decay[0]
    opt = build_optimizer(optimizer, [__import__("torch").zeros(1, requires_grad=True)])
    lr_at = build_schedule(tc.schedule, tc.optimizer["lr"])
    assert opt.param_groups[0]["lr"] == tc.optimizer["lr"]
    assert 0 < lr_at(0, 100) <= tc.optimizer["lr"]
    assert 0 < lr_at(50, float("inf")) <= tc.optimizer["lr"]


@pytest.mark.parametrize(
    "command, schema",
    [("prepare", PrepareConfig), ("train", TrainConfig), ("eval", EvalConfig), ("sample", GenerateConfig)],
)
def test_primary_configs_validate(command, schema):
    cfg = parse(compose(command, []), schema)
    assert cfg.workdir == "./carlos_run"


def test_baseline_matches_the_original_script():
    tc = parse(compose("train", []), TrainConfig)
    m = tc.model
    assert (m.d_model, m.n_layers, m.n_heads, m.d_ff) == (64, 2, 4, 192)
    # tuned defaults (docs/PERFORMANCE.md): the original script's 4,096 tokens a step (4 x 4 windows of 256) as one
    # micro-batch of 32 windows of the default seq_len 128
    pc = parse(compose("prepare", []), PrepareConfig)
    assert tc.data.micro_batch_size * tc.trainer.accumulate_grad_batches * pc.data.seq_len == 4096
    assert tc.schedule["min_lr"] == 1e-5 and 1000 <= tc.schedule["warmup_steps"] <= 2000


def test_precision_group_and_explicit_key():
    assert compose("train", []).trainer.precision == "auto"
    assert compose("train", ["precision=bf16"]).trainer.precision == "bf16-mixed"
    assert compose("train", ["precision=fp32"]).trainer.precision == "32-true"
    assert compose("train", ["precision=fp16"]).trainer.precision == "16-mixed"
    # the plain key wins over the group, whatever the order on the command line
    assert compose("train", ["trainer.precision=32-true", "precision=bf16"]).trainer.precision == "32-true"
    assert compose("train", ["precision=bf16", "trainer.precision=32-true"]).trainer.precision == "32-true"


def test_unknown_keys_and_bad_values_are_refused():
    with pytest.raises(CarlosError, match="unknown key 'optimizer.lrr'.*optimizer.lr"):
        validate("train", ["optimizer.lrr=1"], list(config_keys(compose("train", []))))
    with pytest.raises(CarlosError, match="unknown model 'basline'.*baseline"):
        validate("train", ["model=basline"], [])
    with pytest.raises(CarlosError, match="unknown key 'data.seqlen'"):
        parse(compose("prepare", ["+data.seqlen=3"]), PrepareConfig)
    with pytest.raises(CarlosError, match="micro_batch_size must be > 0"):
        parse(compose("train", ["data.micro_batch_size=0"]), TrainConfig)
    with pytest.raises(CarlosError, match="invalid value for 'trainer.max_steps'"):
        parse(compose("train", ["trainer.max_steps=abc"]), TrainConfig)
    with pytest.raises(CarlosError, match="max_new_tokens must be >= 0"):
        parse(compose("sample", ["max_new_tokens=-1"]), GenerateConfig)


def _overrides(command, args):
    return translate(command, args, config_keys(compose(command, [])))[1]


def test_every_script_style_flag_maps_onto_an_existing_key():
    for command in SCRIPT_FLAGS:
        keys = config_keys(compose(command, []))
        for flag, key in flag_keys(command, keys).items():
            assert key in keys, (command, flag, key)


def test_original_readme_flags_translate():
    assert _overrides("prepare", ["--input", "corpus.txt", "--seq_len", "512", "--normalize_nfkc"]) == [
        "input='corpus.txt'",
        "data.seq_len=512",
        "data.normalize_nfkc=true",
    ]
    cfg = compose(
        "train",
        _overrides(
            "train",
            [
                "--workdir",
                "./carlos_run",
                "--precision",
                "auto",
                "--micro_batch_size",
                "4",
                "--grad_accum_steps",
                "4",
                "--sample_prefix",
                "\\n",
                "--sample_tokens",
                "200",
                "--wandb_project",
                "tiny-models",
                "--wandb_run_name",
                "carlos-demo",
                "--wandb_tags",
                "baseline",
                "byte-level",
                "--peak_lr",
                "1e-3",
                "--max_time",
                "00:00:10:00",
                "--resume",
                "auto",
            ],
        ),
    )
    tc = parse(cfg, TrainConfig)
    assert tc.wandb.tags == ["baseline", "byte-level"] and tc.wandb.project == "tiny-models"
    assert tc.sample.prompt == "\n" and tc.optimizer["lr"] == 1e-3 and tc.resume == "auto"
    assert tc.trainer.max_time_delta.total_seconds() == 600
    assert _overrides("train", ["--resume"]) == ["resume=true"]
    assert _overrides("train", ["--max_time=90"]) == ["trainer.max_time='90'"]
    assert _overrides("train", ["--d_model", "128"]) == ["model.d_model=128"]
    assert _overrides("train", ["--trainer.gradient_clip_val", "0.5"]) == ["trainer.gradient_clip_val=0.5"]
    assert _overrides("eval", ["--checkpoint", "best", "--split", "test", "--json"]) == [
        "checkpoint='best'",
        "split='test'",
        "json=true",
    ]


def test_list_and_boolean_flags():
    assert _overrides("train", ["--betas", "0.9", "0.99"]) == ["optimizer.betas=[0.9,0.99]"]
    assert _overrides("train", ["--wandb_tags", "1", "a b"]) == ["wandb.tags=['1','a b']"]
    assert _overrides("train", ["--overwrite", "no", "--resume", "auto"]) == ["overwrite=false", "resume=auto"]
    with pytest.raises(CarlosError, match="--overwrite takes true or false, got 'maybe'"):
        _overrides("train", ["--overwrite", "maybe"])


def test_the_samples_prompt_keeps_its_old_name_as_an_alias():
    new = _overrides("train", ["--sample_prompt", "Once", "sample.prompt=a"])
    old = _overrides("train", ["--sample_prefix", "Once", "sample.prefix=a"])
    assert new == old == ["sample.prompt='Once'", "sample.prompt=a"]
    swept = _overrides("train", ["-m", "sample.prefix=a,b", "+sample.prefix=c"])
    assert swept == ["sample.prompt=a,b", "+sample.prompt=c"]
    cfg = compose("train", _overrides("train", ["sample.prefix=x"]))
    assert parse(cfg, TrainConfig).sample.prompt == "x"


def test_unknown_flag_names_the_nearest():
    with pytest.raises(CarlosError, match="unknown flag --peak_lrr.*--peak_lr"):
        _overrides("train", ["--peak_lrr", "1"])
    with pytest.raises(CarlosError, match="seq_len is fixed when the data is prepared"):
        _overrides("train", ["--seq_len", "64"])


NASTY = [
    "hello world",
    "a, b, c",
    'it\'s "quoted"',
    "${oc.env:HOME}",
    "back\\slash\\",
    "C:\\Users\\me\\corpus.txt",
    "tail\\'",
    "\\${x}",
    "=[]{}()",
    "line\nbreak",
    "é🙂",
    "%d %s",
    "",
    "  spaced  ",
    "123",
    "null",
    "true",
]


@pytest.mark.parametrize("text", NASTY)
def test_values_pass_through_hydra_unchanged(text):
    cfg = compose("sample", [f"prompt={hydra_quote(text)}"])
    assert cfg.prompt == text
    assert compose("sample", _overrides("sample", ["--prompt", text])).prompt == text
    assert compose("prepare", _overrides("prepare", ["--input", text])).input == text


def test_prompt_escapes():
    assert decode_escapes("a\\nb\\tc\\\\n\\x41\\u00e9") == "a\nb\tc\\nAé"
    assert parse(compose("sample", ["prompt='\\n'"]), GenerateConfig).prompt == "\n"


def test_every_command_shares_the_hydra_settings():
    """conf/hydra_settings.yaml: no outputs/ dir, no .hydra/ from Hydra, no log files, no chdir."""
    for name in ("prepare", "train", "eval", "sample", "bench"):
        assert "hydra_settings" in (Path(conf_dir()) / f"{name}.yaml").read_text()
        hydra = compose(name, [], with_hydra=True).hydra
        assert hydra.run.dir == "." and hydra.output_subdir is None and hydra.job.chdir is False
        assert hydra.runtime.choices["hydra/job_logging"] == "none"


def test_experiment_presets_compose_and_validate():
    cpu = parse(compose("train", ["experiment=cpu_10min"]), TrainConfig)
    assert cpu.trainer.max_time == "600" and cpu.trainer.max_steps == -1 and cpu.model.d_model == 64
    gpu = parse(compose("train", ["experiment=gpu"]), TrainConfig)
    assert gpu.model.d_model == 128 and gpu.trainer.accelerator == "gpu" and gpu.data.micro_batch_size == 128
    overridden = parse(compose("train", ["experiment=cpu_10min", "trainer.max_time=60"]), TrainConfig)
    assert overridden.trainer.max_time == "60"  # the command line wins over the preset
    with pytest.raises(CarlosError, match=r"unknown experiment 'cpu10' \(did you mean 'cpu_10min'\?\)"):
        validate("train", ["experiment=cpu10"], [])


def test_a_preset_of_your_own_is_found_and_validated(tmp_path, capsys, monkeypatch):
    from carlos.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine" / "experiment").mkdir(parents=True)
    (tmp_path / "mine" / "experiment" / "short.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 77\n")
    (tmp_path / "mine" / "experiment" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_stepz: 7\n")
    main(["train", "--config-dir", "mine", "experiment=short", "--cfg", "job"])
    assert "max_steps: 77" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["train", "--config-dir", "mine", "experiment=typo", "--cfg", "job"])
    assert stop.value.code == 2
    assert "unknown key 'trainer.max_stepz' (did you mean 'trainer.max_steps'?)" in capsys.readouterr().err
