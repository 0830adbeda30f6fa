import copy
import math

import pytest
import torch

from carlos.generate import filter_logits, generate
from carlos.memory import num_params
from carlos.model import GPT, KVCache, ModelConfigError
from tests.conftest import gpt_config


def small(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config(**{"vocab_size": 256, "block_size": 32, **kw}))


def test_logits_shape():
    model = small()
    x = torch.randint(0, 256, (3, 20))
    assert model(x).shape == (3, 20, 256)


def test_baseline_has_about_100k_parameters():
    assert GPT(gpt_config(vocab_size=256, block_size=256)).num_params() == 99_968  # tied embedding counted once
    # the original script's model: the same with a learned position table, which grows with the context
    assert GPT(gpt_config(vocab_size=256, block_size=256, pos="learned")).num_params() == 116_352


def test_causal_future_tokens_do_not_change_past_logits():
    model = small().eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 256
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10], atol=1e-6)
    assert not torch.allclose(model(x)[0, 10:], model(y)[0, 10:])


def test_loss_at_init_is_near_uniform():
    model = small(block_size=64)
    x = torch.randint(0, 256, (8, 64))
    loss = model.loss(x, torch.randint(0, 256, (8, 64)))
    assert abs(loss.item() - math.log(256)) < 0.1


def test_ignored_targets_are_not_scored():
    model = small()
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    y_masked = y.clone()
    y_masked[:, :3] = -1
    full = model.loss(x, y, reduction="none").view(2, 8)
    assert torch.allclose(model.loss(x, y_masked, reduction="sum"), full[:, 3:].sum())


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"n_heads": 5}, "does not divide"),
        ({"d_model": 0}, "positive"),
        ({"n_layers": -1}, "positive"),
        ({"d_ff": 0}, "positive"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_shapes_are_refused(kw, message):
    with pytest.raises(ModelConfigError, match=message):
        gpt_config(**kw)


def test_weight_decay_only_on_matrices():
    model = small()
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_gpt2_init_scales_residual_projections():
    model = GPT(gpt_config(n_layers=8))
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002
    assert model.head.weight is model.tok_emb.weight


def test_kv_cache_matches_full_forward():
    model = small().eval()
    x = torch.randint(0, 256, (1, 20))
    full = model(x)
    cache = KVCache(model, 1, torch.device("cpu"), torch.float32)
    first = model(x[:, :12], cache)  # prefill
    steps = [model(x[:, i : i + 1], cache) for i in range(12, 20)]
    assert torch.allclose(first, full[:, :12], atol=1e-5)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 12:], atol=1e-5)


def test_greedy_generation_is_deterministic_and_matches_argmax():
    model = small().eval()
    prompt = [10, 20, 30]
    a = generate(model, prompt, 10, temperature=0)
    b = generate(model, prompt, 10, temperature=0)
    assert a == b
    ids = torch.tensor([prompt])
    expected = []
    for _ in range(10):
        nxt = int(model(ids)[0, -1].argmax())
        expected.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert a == expected


def test_generation_slides_past_the_context():
    model = small(block_size=16).eval()
    out = generate(model, [1, 2, 3], 50, temperature=0)
    assert len(out) == 50
    g = torch.Generator().manual_seed(1)
    out = generate(model, [1], 40, temperature=1.0, generator=g)
    assert len(out) == 40 and all(0 <= t < 256 for t in out)


def test_generation_stops_at_eos():
    model = small(vocab_size=258).eval()
    with torch.no_grad():
        model.ln_f.bias.fill_(1.0)  # every final hidden state gets a +1 component...
        model.head.weight[257] = 1.0  # ...that only EOS's output row reads: EOS wins
    out = generate(model, [1], 20, temperature=0, eos_id=257)
    assert out[-1] == 257 and len(out) < 20


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    k2 = filter_logits(logits, 1.0, 2, 1.0)
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, 0)  # [0.636, 0.234, 0.086, ...]
    p = filter_logits(logits, 1.0, 0, 0.7)
    assert torch.isfinite(p).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.7 < probs[0] + probs[1]
    top1 = filter_logits(logits, 1.0, 0, 0.1)
    assert torch.isfinite(top1).tolist() == [True, False, False, False, False]


MODERN = {"bias": False, "norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "d_ff": 176}


def test_modern_has_the_original_scripts_budget_and_no_biases():
    base = GPT(gpt_config(vocab_size=256, block_size=256, pos="learned")).num_params()  # its position table too
    modern = GPT(gpt_config(vocab_size=256, block_size=256, **MODERN))
    assert abs(modern.num_params() - base) / base < 0.01
    assert not any(name.endswith("bias") for name, _ in modern.named_parameters())
    assert modern.pos_emb is None and isinstance(modern.ln_f, torch.nn.RMSNorm)


def test_modern_is_causal_and_its_kv_cache_matches():
    model = small(**MODERN).eval()
    x = torch.randint(0, 256, (1, 20))
    y = x.clone()
    y[0, 12:] = (y[0, 12:] + 7) % 256
    full = model(x)
    assert torch.allclose(full[0, :12], model(y)[0, :12], atol=1e-6)
    cache = KVCache(model, 1, torch.device("cpu"), torch.float32)
    first = model(x[:, :9], cache)
    steps = [model(x[:, i : i + 1], cache) for i in range(9, 20)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)
    assert len(generate(model, [1, 2], 60, temperature=0)) == 60  # slides past the 32-token context


def test_rope_depends_on_relative_position_only():
    from carlos.model import apply_rope, rope_tables

    cos, sin = rope_tables(8, 64, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        return (apply_rope(q, cos[i], sin[i]) * apply_rope(k, cos[j], sin[j])).sum()

    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


# ---------------------------------------------------------------- options from the speed-run literature


def test_relu2_mlp_is_relu_squared():
    model = small(mlp="relu2")
    mlp = model.blocks[0].mlp
    x = torch.randn(2, 5, 64)
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model = small(qk_norm=True, bias=False).eval()
    x = torch.randint(0, 256, (2, 16))
    before = model(x)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * 64] *= 5.0  # the query and key rows
    assert torch.allclose(model(x), before, atol=1e-5)
    plain = small(bias=False).eval()
    assert not torch.allclose(plain(x), small(qk_norm=True, bias=False).eval()(x), atol=1e-3)


def test_logit_softcap_bounds_the_logits_and_keeps_their_order():
    capped, plain = small(logit_softcap=2.0).eval(), small().eval()
    with torch.no_grad():
        for m in (capped, plain):
            m.tok_emb.weight *= 40  # logits far beyond the cap
    x = torch.randint(0, 256, (1, 8))
    logits, raw = capped(x), plain(x)
    assert logits.abs().max() <= 2.0 < raw.abs().max()
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0))  # the same model, its logits capped
    for bad in (0.0, 0.5, 1e308):
        with pytest.raises(ModelConfigError, match="logit_softcap must be a number from 1 to 1000"):
            small(logit_softcap=bad)
    with pytest.raises(ModelConfigError, match=r"logit_softcap is True \(bool\), not a number or None"):
        small(logit_softcap=True)


def test_zero_init_starts_every_block_as_the_identity():
    model = small(zero_init=True, dropout=0.0)
    x = torch.randn(2, 7, 64)
    for block in model.blocks:
        assert torch.equal(block(x), x)
    assert small().blocks[0].attn.proj.weight.abs().sum() > 0  # the default is GPT-2's init


def test_muon_steps_the_block_matrices_and_adamw_the_rest():
    from carlos.optimization import MuonWithAdamW

    model = small()
    groups = model.param_groups(0.1, muon=True)
    opt = MuonWithAdamW(groups, lr=1e-3)
    matrices = {id(p) for p in groups[0]["params"]}
    assert groups[0]["muon"] and len(matrices) == 8  # qkv, proj, fc, proj of 2 blocks
    assert id(model.tok_emb.weight) not in matrices  # embeddings stay on AdamW
    x = torch.randint(0, 256, (2, 16))
    model.loss(x, x).backward()
    opt.step()
    for p in model.parameters():
        assert set(opt.state[p]) == ({"momentum_buffer"} if id(p) in matrices else {"step", "exp_avg", "exp_avg_sq"})
    # the state dict round-trips: a fresh optimizer loaded from it takes the same next step
    twin = small()
    twin.load_state_dict(model.state_dict())
    twin_opt = MuonWithAdamW(twin.param_groups(0.1, muon=True), lr=1e-3)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: torch would share the tensors
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m.loss(x, x).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def test_muon_split_qkv_orthogonalizes_q_k_and_v_each_as_a_matrix_of_its_own():
    from carlos.optimization import MuonWithAdamW

    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(12, 4))
    stacked.stacked = 3  # as CausalSelfAttention marks its qkv weight
    apart = [torch.nn.Parameter(b.detach().clone()) for b in stacked.chunk(3)]

    def muon(params, **kw):  # AdamW needs a parameter of its own
        return MuonWithAdamW([{"params": params, "muon": True}, {"params": [torch.zeros(1)]}], lr=0.1, **kw)

    opts = [muon([stacked], split_qkv=True), muon(apart)]  # apart: torch's Muon on three 4 x 4 matrices
    for _ in range(3):  # the momentum buffer carries over
        grad = torch.randn(12, 4)
        stacked.grad = grad.clone()
        for p, g in zip(apart, grad.chunk(3), strict=True):
            p.grad = g.clone()
        for o in opts:
            o.step()
    assert torch.allclose(stacked.detach(), torch.cat([p.detach() for p in apart]), atol=1e-6)
    assert set(opts[0].state[stacked]) == {"momentum_buffer"}
    # without split_qkv the stacked matrix is one matrix to torch's Muon: a different step
    whole = torch.nn.Parameter(torch.cat([p.detach() for p in apart]))
    whole.stacked, whole.grad = 3, torch.randn(12, 4)
    split = torch.nn.Parameter(whole.detach().clone())
    split.stacked, split.grad = 3, whole.grad.clone()
    muon([whole]).step()
    muon([split], split_qkv=True).step()
    assert not torch.allclose(whole, split, atol=1e-4)


def test_the_parameter_count_by_hand_is_the_models_own():
    """memory.num_params answers for any size at once (a model too big to build is refused by it), so it
    counts by hand: it must count what GPT builds, for every option that changes the weights."""
    for settings in (
        {},
        {"pos": "learned", "vocab_size": 258},
        {"norm": "rmsnorm", "mlp": "swiglu", "bias": False},
        {"mlp": "relu2", "n_layers": 3, "qk_norm": True, "block_size": 64},
    ):
        cfg = gpt_config(**settings)
        assert num_params(cfg) == GPT(cfg).num_params(), settings
