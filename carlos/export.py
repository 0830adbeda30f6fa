"""`carlos export`: a checkpoint's model for use elsewhere.

    --format safetensors   model.safetensors (carlos's parameter names) + config.json (the model, the
                           tokenizer, the data's hash): loadable without pickle (load_safetensors)
    --format hf            a directory Hugging Face transformers loads with AutoModelForCausalLM and
                           AutoTokenizer: GPT-2 for the learned-position / LayerNorm / GELU family,
                           GPT-NeoX for RoPE / LayerNorm / GELU, Llama for RoPE / RMSNorm / SwiGLU;
                           byte-level tokens with carlos's ids

The Hugging Face model is built with transformers itself (its config classes and save_pretrained), and its
logits are checked against carlos's on a probe text before anything is written. Imports no Lightning.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from carlos.checkpoint import ADDED_MODEL_SETTINGS, build_model, check_checkpoint, load_checkpoint
from carlos.config import ExportConfig
from carlos.errors import CarlosError
from carlos.files import write_atomic, write_error
from carlos.lock import DirLock
from carlos.manifest import RECORD, Manifest
from carlos.model import GPT, GPTConfig
from carlos.ownership import Place, resolve_checkpoint
from carlos.tokenizer import BOS_ID, BYTES, EOS_ID, ByteTokenizer

PROBE = "Exported from carlos: the same logits, byte for byte.\n"
TOLERANCE = 1e-4  # largest difference of a logit between carlos and transformers that an export accepts


def export(cfg: ExportConfig) -> Path:
    """Write the checkpoint's model into cfg.out in cfg.format; returns the directory."""
    out = Path(os.path.expanduser(cfg.out))
    if out.exists() and not out.is_dir():
        raise CarlosError(f"--out {out} is a file; give a directory")
    fix = "choose a new directory for --out, or an earlier export's"
    place = Place(out, "export", f"--out {out}", fix, DirLock(out, "export", fix=fix))
    place.refuse_misplaced()  # before the model is converted, which takes seconds
    path = resolve_checkpoint(cfg.workdir, cfg.checkpoint, cfg.run)
    ckpt = load_checkpoint(path)
    model_cfg, tok = check_checkpoint(ckpt, path)
    model = build_model(ckpt, model_cfg, torch.device("cpu"), f"exporting {path}", "free some memory", 1, 1, False)
    meta = {k: ckpt["carlos"].get(k) for k in ("step", "seq_len", "data_sha256", "val")}
    if cfg.format == "hf":
        files, diff = hf_files(model, tok, meta)
        check = f"; transformers' logits differ from carlos's by at most {diff:.1e}"
    else:
        files, check = safetensors_files(model, tok, meta), ""
    with place:
        try:
            install(place.manifest, out, files)
        except BaseException:
            if place.made:  # a directory this export made goes again (Place removes it once empty)
                (out / RECORD).unlink(missing_ok=True)
            raise
    print(f"exported {path} (step {meta['step']}) as {cfg.format} to {out}: {', '.join(files)}{check}")
    return out


def install(manifest: Manifest, out: Path, files: dict[str, bytes]) -> None:
    """An export is installed whole or not at all. Its files are written beside first (a full disk fails
    there, with nothing changed); then the earlier export's files move aside, config.json first, and the
    new ones are renamed in, config.json last: config.json is what every reader opens first, so no loader
    ever finds a config beside the other export's weights (a kill -9 among the renames leaves none, which
    transformers and carlos refuse to load). Any failure, a signal included, puts the earlier one back."""
    manifest.refuse_foreign([out / name for name in files], [], "move it away, or choose another --out")
    manifest.remove_stale()
    order = sorted(files, key=lambda name: name == "config.json")  # config.json last
    earlier = [f for f in manifest.owned_files(out) if f.parent == out and manifest.entries.get(f.name) == "file"]
    earlier.sort(key=lambda f: f.name != "config.json")  # config.json first
    tmp = manifest.scratch()
    try:
        for name in order:
            write_atomic(tmp / name, lambda f, data=files[name]: f.write(data), "--out")
        with manifest.kept_on_failure(), manifest.aside(earlier) as old:
            manifest.claim(*(out / name for name in order))
            _rename_all(tmp, out, order)
            old.commit()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_all(tmp: Path, out: Path, names: list[str]) -> None:
    """Each file from tmp into out, in order; on a failure, the ones already moved go again (the earlier
    export's, which they replaced, come back from aside)."""
    installed: list[Path] = []
    try:
        for name in names:
            os.replace(tmp / name, out / name)
            installed.append(out / name)
    except BaseException as e:
        for f in installed:
            f.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(out / name, e, "--out") from None
        raise


# ---------------------------------------------------------------- safetensors


def safetensors_files(model: GPT, tok: ByteTokenizer, meta: dict[str, Any]) -> dict[str, bytes]:
    """model.safetensors with carlos's names (the output head is the tied embedding, stored once) and
    config.json with everything needed to rebuild the model and its tokenizer."""
    from safetensors.torch import save

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    config = {"format": "carlos", "model": model.cfg.to_dict(), "tokenizer": tok.to_dict(), **meta}
    return {
        "model.safetensors": save(state, metadata={"format": "pt"}),
        "config.json": (json.dumps(config, indent=2) + "\n").encode("utf-8"),
    }


def load_safetensors(directory: str | Path) -> tuple[GPT, ByteTokenizer]:
    """The model and tokenizer of a `--format safetensors` export, read without pickle."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model = GPT(GPTConfig(**{**ADDED_MODEL_SETTINGS, **config["model"]}))  # an earlier export lacks the newer ones
    state = load_file(directory / "model.safetensors")
    model.load_state_dict({**state, "head.weight": state["tok_emb.weight"]})
    return model.eval(), ByteTokenizer.from_dict(config["tokenizer"])


# ---------------------------------------------------------------- Hugging Face transformers


def hf_family(cfg: GPTConfig) -> str:
    """gpt2, gpt_neox or llama: the transformers architecture that computes exactly what this model does."""
    if cfg.qk_norm or cfg.logit_softcap is not None:
        raise CarlosError(
            "a model with model.qk_norm or model.logit_softcap has no Hugging Face equivalent among GPT-2, "
            "GPT-NeoX and Llama; export it with --format safetensors"
        )
    if (cfg.pos, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        return "gpt2"
    if (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    if (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "layernorm", "gelu"):
        return "gpt_neox"
    raise CarlosError(
        f"a model with pos={cfg.pos}, norm={cfg.norm} and mlp={cfg.mlp} has no Hugging Face equivalent: GPT-2 "
        "needs learned positions, LayerNorm and GELU, GPT-NeoX rotary positions, LayerNorm and GELU, Llama "
        "rotary positions, RMSNorm and SwiGLU; export it with --format safetensors"
    )


def hf_files(model: GPT, tok: ByteTokenizer, meta: dict[str, Any]) -> tuple[dict[str, bytes], float]:
    """The files of a transformers directory, and the largest logit difference on the probe text."""
    try:
        import transformers
    except ImportError:
        raise CarlosError(
            "--format hf needs Hugging Face transformers, which is not installed; pip install 'carlos[hf]' "
            "(or use --format safetensors)"
        ) from None
    transformers.utils.logging.disable_progress_bar()  # its bars for writing and loading one small file
    family = hf_family(model.cfg)
    hf = {"gpt2": _gpt2, "gpt_neox": _neox, "llama": _llama}[family](model, tok, transformers)
    diff = _largest_difference(model, hf, tok)
    if not diff <= TOLERANCE:  # a conversion that computes something else is never written
        raise CarlosError(f"the exported {family} model's logits differ from carlos's by {diff:.2e}; report this")
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf_tokenizer(tok, model.cfg.block_size, transformers).save_pretrained(tmp)
        (Path(tmp) / "carlos.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return files, diff


def _special_ids(tok: ByteTokenizer) -> dict[str, int | None]:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}


def _gpt2(model: GPT, tok: ByteTokenizer, transformers) -> torch.nn.Module:
    """GPT2LMHeadModel: pre-LayerNorm blocks, exact GELU, learned positions, tied head. Its Conv1D weights
    are (in, out), the transpose of nn.Linear's; a model without biases gets zero biases."""
    c = model.cfg
    config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.d_model, n_layer=c.n_layers, n_head=c.n_heads,
        n_inner=c.d_ff, activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=c.dropout,
        embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=True, **_special_ids(tok),
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    ours = model.state_dict()
    state = {"transformer.wte.weight": ours["tok_emb.weight"], "transformer.wpe.weight": ours["pos_emb.weight"]}
    names = {"ln1": "ln_1", "ln2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj"}
    names |= {"mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(c.n_layers):
        for theirs_name, hf_name in names.items():
            weight = ours[f"blocks.{i}.{theirs_name}.weight"]
            state[f"transformer.h.{i}.{hf_name}.weight"] = weight if weight.dim() == 1 else weight.t()
            state[f"transformer.h.{i}.{hf_name}.bias"] = _or_zeros(ours, f"blocks.{i}.{theirs_name}.bias", weight)
    state["transformer.ln_f.weight"] = ours["ln_f.weight"]
    state["transformer.ln_f.bias"] = _or_zeros(ours, "ln_f.bias", ours["ln_f.weight"])
    _load(hf, state)
    return hf


def _neox(model: GPT, tok: ByteTokenizer, transformers) -> torch.nn.Module:
    """GPTNeoXForCausalLM with sequential residuals: pre-LayerNorm blocks, exact GELU, rotary positions on
    the two halves of every head's whole width, tied head. Its fused qkv holds each head's q, k and v
    together; carlos's holds all queries, then all keys, then all values."""
    c = model.cfg
    config = transformers.GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        intermediate_size=c.d_ff, hidden_act="gelu", max_position_embeddings=c.block_size, layer_norm_eps=1e-5,
        rotary_pct=1.0, rotary_emb_base=float(c.rope_base), use_parallel_residual=False, attention_bias=True,
        attention_dropout=c.dropout, hidden_dropout=c.dropout, tie_word_embeddings=True, **_special_ids(tok),
    )  # fmt: skip
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    ours, heads = model.state_dict(), c.n_heads

    def per_head(qkv: torch.Tensor) -> torch.Tensor:  # (3d, ...) as [q; k; v] -> as [q_h, k_h, v_h] per head
        return qkv.view(3, heads, -1, *qkv.shape[1:]).transpose(0, 1).reshape(qkv.shape)

    state = {"gpt_neox.embed_in.weight": ours["tok_emb.weight"]}
    state["gpt_neox.final_layer_norm.weight"] = ours["ln_f.weight"]
    state["gpt_neox.final_layer_norm.bias"] = _or_zeros(ours, "ln_f.bias", ours["ln_f.weight"])
    names = {"ln1": "input_layernorm", "ln2": "post_attention_layernorm", "attn.proj": "attention.dense"}
    names |= {"mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for our_name, hf_name in names.items():
            weight = ours[f"{b}{our_name}.weight"]
            state[f"{h}{hf_name}.weight"] = weight
            state[f"{h}{hf_name}.bias"] = _or_zeros(ours, f"{b}{our_name}.bias", weight)
        state[h + "attention.query_key_value.weight"] = per_head(ours[b + "attn.qkv.weight"])
        qkv = ours[b + "attn.qkv.weight"]
        state[h + "attention.query_key_value.bias"] = per_head(_or_zeros(ours, b + "attn.qkv.bias", qkv))
    _load(hf, state)
    return hf


def _or_zeros(ours: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The bias `name` of carlos's state dict, or zeros for a model without biases (both formats have them)."""
    return ours[name] if name in ours else torch.zeros(weight.shape[0])


def _llama(model: GPT, tok: ByteTokenizer, transformers) -> torch.nn.Module:
    """LlamaForCausalLM: RMSNorm with torch's default eps, rotary positions on the two halves of each head
    (the rotation carlos uses), SwiGLU as gate and up projections, tied head."""
    c = model.cfg
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, max_position_embeddings=c.block_size,
        rms_norm_eps=torch.finfo(torch.float32).eps, rope_theta=float(c.rope_base), attention_bias=c.bias,
        mlp_bias=c.bias, attention_dropout=c.dropout, hidden_act="silu", tie_word_embeddings=True,
        **_special_ids(tok),
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    ours, d, f = model.state_dict(), c.d_model, c.d_ff
    state = {"model.embed_tokens.weight": ours["tok_emb.weight"], "model.norm.weight": ours["ln_f.weight"]}
    for i in range(c.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        state[h + "input_layernorm.weight"] = ours[b + "ln1.weight"]
        state[h + "post_attention_layernorm.weight"] = ours[b + "ln2.weight"]
        for suffix in ("weight", "bias") if c.bias else ("weight",):
            qkv, fc = ours[f"{b}attn.qkv.{suffix}"], ours[f"{b}mlp.fc.{suffix}"]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{h}self_attn.{name}.{suffix}"] = qkv[j * d : (j + 1) * d]
            state[f"{h}self_attn.o_proj.{suffix}"] = ours[f"{b}attn.proj.{suffix}"]
            state[f"{h}mlp.gate_proj.{suffix}"], state[f"{h}mlp.up_proj.{suffix}"] = fc[:f], fc[f:]
            state[f"{h}mlp.down_proj.{suffix}"] = ours[f"{b}mlp.proj.{suffix}"]
    _load(hf, state)
    return hf


def _load(hf: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every weight of the transformers model set, nothing left over (its tied head is its embedding)."""
    missing, unexpected = hf.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")]
    if missing or unexpected:
        raise CarlosError(f"the export left weights unset ({missing[:3]}) or unused ({unexpected[:3]}); report this")
    hf.tie_weights()


@torch.no_grad()
def _largest_difference(model: GPT, hf: torch.nn.Module, tok: ByteTokenizer) -> float:
    ids = torch.tensor([tok.encode_document(PROBE)[: model.cfg.block_size]])
    ours = model(ids)
    theirs = hf(input_ids=ids).logits
    diff = (ours - theirs).abs().max().item()
    return diff if math.isfinite(diff) else math.inf


# ---------------------------------------------------------------- the tokenizer


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte (tokenizers' ByteLevel pre-tokenizer maps bytes to these):
    printable Latin-1 bytes stand for themselves, the others for the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(others)) for b in range(BYTES)]


def hf_tokenizer(tok: ByteTokenizer, block_size: int, transformers):
    """A fast tokenizer whose ids are carlos's: the byte b is id b (a byte-level BPE without merges), BOS
    256 and EOS 257 when the data has them; a text starts with BOS when the model was trained so."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    specials = [name for name, i in (("<bos>", BOS_ID), ("<eos>", EOS_ID)) if i < tok.vocab_size]
    backend.add_special_tokens([AddedToken(name, special=True) for name in specials])
    if tok.add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    named = {"bos_token": "<bos>" if tok.add_bos else None, "eos_token": "<eos>" if tok.add_eos else None}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=block_size, **{k: v for k, v in named.items() if v}
    )
