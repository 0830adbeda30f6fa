"""carlos export: safetensors read back without pickle, and Hugging Face directories loaded by transformers
itself (AutoModelForCausalLM, AutoTokenizer) whose logits match carlos's and whose generate() writes text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carlos.checkpoint import load_checkpoint, model_from_checkpoint
from carlos.config import ExportConfig
from carlos.errors import CarlosError
from carlos.export import byte_symbols, export, hf_family, load_safetensors
from carlos.tokenizer import ByteTokenizer
from carlos.train import train

from .conftest import gpt_config, make_corpus, prepare_workdir, train_cfg

TEXT = "Où est-il? 東京, café.\n"  # 28 bytes: within the test models' context of 32


def trained(workdir: Path, model: str, *overrides: str) -> Path:
    train(train_cfg(workdir, f"model={model}", "trainer.max_steps=4", "sample.tokens=0", *overrides))
    return workdir / "checkpoints" / "best.pt"


def carlos_logits(checkpoint: Path, ids: list[int]) -> torch.Tensor:
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    with torch.no_grad():
        return model(torch.tensor([ids]))


@pytest.fixture
def bos_eos_workdir(tmp_path: Path) -> Path:
    return prepare_workdir(make_corpus(tmp_path / "c.txt"), tmp_path / "w2", "data.add_bos=true", "data.add_eos=true")


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, architecture, specials",
    [
        ("baseline", "GPTNeoXForCausalLM", False),
        ("baseline model.pos=learned", "GPT2LMHeadModel", False),
        ("baseline model.pos=rope model.bias=false", "GPTNeoXForCausalLM", False),
        ("medium", "GPT2LMHeadModel", False),
        ("modern", "LlamaForCausalLM", False),
        ("baseline", "GPTNeoXForCausalLM", True),
        ("baseline model.pos=learned", "GPT2LMHeadModel", True),
        ("modern", "LlamaForCausalLM", True),
    ],
)
def test_transformers_loads_the_export_computes_the_same_logits_and_generates(
    workdir, bos_eos_workdir, tmp_path, monkeypatch, model, architecture, specials
):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    w = bos_eos_workdir if specials else workdir
    checkpoint = trained(w, *model.split())
    out = tmp_path / "hf"
    export(ExportConfig(str(w), None, "best", "hf", str(out)))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == architecture
    ours = ByteTokenizer(add_bos=specials, add_eos=specials)
    ids = tokenizer(TEXT).input_ids
    assert ids == ([256] if specials else []) + list(TEXT.encode("utf-8"))  # carlos's ids: bytes, then BOS 256
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (ours.bos_id, ours.eos_id)
    assert hf.config.vocab_size == ours.vocab_size

    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits
    assert theirs.shape == (1, len(ids), ours.vocab_size)
    assert (theirs - carlos_logits(checkpoint, ids)).abs().max().item() < 1e-4

    prompt = tokenizer("To be", return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    new = generated[0, prompt.input_ids.shape[1] :]
    assert 1 <= len(new) <= 12 and isinstance(tokenizer.decode(new, skip_special_tokens=True), str)
    greedy = carlos_logits(checkpoint, prompt.input_ids[0].tolist())[0, -1].argmax().item()
    assert new[0].item() == greedy  # transformers' first greedy token is carlos's

    meta = json.loads((out / "carlos.json").read_text())
    assert meta["step"] == 4 and meta["data_sha256"] == json.loads((w / "splits.json").read_text())["sha256"]


@pytest.mark.slow
def test_safetensors_export_loads_without_pickle_into_the_same_model(workdir, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.setenv("WANDB_MODE", "disabled")
    checkpoint = trained(workdir, "modern")
    out = tmp_path / "st"
    export(ExportConfig(str(workdir), None, "best", "safetensors", str(out)))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]
    with safe_open(out / "model.safetensors", framework="pt") as f:  # no pickle anywhere
        assert "tok_emb.weight" in f.keys() and "head.weight" not in f.keys()  # noqa: SIM118  # the tied head is stored once
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["pos"] == "rope" and config["tokenizer"]["vocab_size"] == 256
    assert config["data_sha256"] == json.loads((workdir / "splits.json").read_text())["sha256"]
    model, tok = load_safetensors(out)
    ids = tok.encode(TEXT)[:32]
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])), carlos_logits(checkpoint, ids))

    # exporting again into the same directory in the other format leaves no file of the first behind
    pytest.importorskip("transformers")
    export(ExportConfig(str(workdir), None, "best", "hf", str(out)))
    assert "carlos.json" in {p.name for p in out.iterdir()}
    export(ExportConfig(str(workdir), None, "best", "safetensors", str(out)))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_a_model_without_a_hugging_face_equivalent_is_refused_and_nothing_is_written(workdir, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    trained(workdir, "baseline", "model.pos=rope", "model.mlp=swiglu")
    with pytest.raises(CarlosError) as refused:
        export(ExportConfig(str(workdir), None, "best", "hf", str(tmp_path / "hf")))
    assert str(refused.value) == (
        "a model with pos=rope, norm=layernorm and mlp=swiglu has no Hugging Face equivalent: GPT-2 needs learned "
        "positions, LayerNorm and GELU, GPT-NeoX rotary positions, LayerNorm and GELU, Llama rotary positions, "
        "RMSNorm and SwiGLU; export it with --format safetensors"
    )
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_export_without_transformers_and_over_a_users_file_are_refused(workdir, tmp_path, monkeypatch):
    import builtins

    monkeypatch.setenv("WANDB_MODE", "disabled")
    trained(workdir, "baseline")
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "__import__", no_transformers)
        with pytest.raises(CarlosError, match=r"^--format hf needs Hugging Face transformers, which is not installed"):
            export(ExportConfig(str(workdir), None, "best", "hf", str(tmp_path / "hf")))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("my own")
    with pytest.raises(CarlosError, match="config.json is a file carlos did not write"):
        export(ExportConfig(str(workdir), None, "best", "safetensors", str(out)))
    assert (out / "config.json").read_text() == "my own" and not (out / "model.safetensors").exists()


def test_byte_symbols_are_gpt2s_byte_level_alphabet():
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and set(symbols) == set(ByteLevel.alphabet())
    assert symbols[ord("A")] == "A" and symbols[ord(" ")] == "Ġ" and symbols[ord("\n")] == "Ċ"  # GPT-2's own


def test_export_config_is_checked():
    for args, message in [
        (("w", None, "best", "onnx", "o"), "unknown export format 'onnx'; choose safetensors or hf"),
        (("w", None, "best", "hf", None), "export needs --out DIR"),
        (("w", "../x", "best", "hf", "o"), "is not a plain name"),
    ]:
        with pytest.raises(CarlosError, match=message.replace("?", r"\?")):
            ExportConfig(*args)


def test_qk_norm_and_softcap_are_refused_naming_every_family_carlos_exports():
    assert hf_family(gpt_config(pos="rope")) == "gpt_neox"  # one of the three, beside GPT-2 and Llama
    for settings in ({"qk_norm": True}, {"logit_softcap": 30.0}, {"pos": "rope", "qk_norm": True}):
        with pytest.raises(CarlosError) as refused:
            hf_family(gpt_config(**settings))
        assert str(refused.value) == (
            "a model with model.qk_norm or model.logit_softcap has no Hugging Face equivalent among GPT-2, GPT-NeoX "
            "and Llama; export it with --format safetensors"
        )
