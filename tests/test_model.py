"""The embedded XComposer: tree and names of the checkpoints, and a forward that does what the real one does."""

import pytest
import torch

from xctune.errors import BadInput
from xctune.models import XComposer, get_config, init_weights, num_params
from xctune.models.loading import load_remote, resolve_model, save_checkpoint
from xctune.models.profile import profile_of
from xctune.models.ixc import generate, make_inputs
from xctune.workload import Workload


def meta_model(name):
    with torch.device("meta"):
        return XComposer(get_config(name))


def test_7b_parameter_counts_match_the_public_checkpoints():
    # design.md §4: counts of the upstream trees instantiated on meta
    vl = meta_model("ixc2-vl-7b")
    assert num_params(vl) == 8_666_840_064
    assert num_params(vl.vit) == 304_172_032
    assert num_params(vl.vision_proj) == 20_979_712
    assert num_params(vl.model.tok_embeddings) == 379_060_224
    assert num_params(vl.output) == 379_060_224
    assert num_params(vl.model.layers[0]) == 236_986_368
    hd = meta_model("ixc2-4khd-7b")
    assert num_params(hd) == 8_597_501_952
    assert num_params(hd.vision_proj) == 33_562_624


def test_parameter_names_are_the_checkpoints_names():
    names = [n for n, _ in meta_model("ixc2-vl-7b").named_parameters()]
    assert names[0] == "model.tok_embeddings.weight"  # self.device = the embeddings' device
    for expected in [
        "vit.vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vit.vision_tower.vision_model.encoder.layers.23.mlp.fc2.weight",
        "vision_proj.0.weight",
        "vision_proj.2.bias",
        "model.layers.31.attention.wqkv.weight",
        "model.layers.0.attention.wqkv.Plora_A.weight",
        "model.layers.0.attention.wo.Plora_B.weight",
        "model.layers.0.feed_forward.w1.Plora_A.weight",
        "model.layers.0.feed_forward.w2.weight",
        "model.layers.0.attention_norm.weight",
        "model.layers.0.ffn_norm.weight",
        "model.norm.weight",
        "output.weight",
    ]:
        assert expected in names
    hd = [n for n, _ in meta_model("ixc2-4khd-7b").named_parameters()]
    assert hd[:2] == ["plora_glb_GN", "plora_sub_GN"]  # registered first: they decide self.device


def test_rotary_buffers_cost_memory_the_parameter_count_hides():
    vl = meta_model("ixc2-vl-7b")
    layer_buffers = sum(b.numel() for b in vl.model.layers[0].buffers())
    assert layer_buffers * 4 == 2 * 32768 * 128 * 4  # cos + sin, fp32: 33.5 MB a layer


def test_image_tokens_per_preset():
    assert get_config("ixc2-vl-7b").image_tokens() == 1225  # 490 px, 35 x 35
    assert get_config("ixc2-4khd-7b").image_tokens((2, 3)) == 1045  # design.md §4
    cfg = get_config("tiny-hd")
    model = init_weights(XComposer(cfg), seed=0).eval()
    w = Workload(prompt_tokens=5, new_tokens=2)
    inputs = make_inputs(cfg, w, "cpu")
    with torch.no_grad():
        emb = model.encode_img(inputs.pixels, cfg.hd_layout)
    assert emb.shape == (1, cfg.image_tokens(), cfg.hidden_size)


@pytest.fixture(scope="module")
def tiny_model():
    return init_weights(XComposer(get_config("tiny")), seed=0).eval()


def test_forward_shapes_and_cache(tiny_model):
    cfg = tiny_model.cfg
    w = Workload(batch=2, prompt_tokens=8, new_tokens=4)
    out = generate(tiny_model, make_inputs(cfg, w, "cpu"), w.new_tokens)
    assert out.tokens.shape == (2, 4)
    assert out.last_logits.shape == (2, cfg.vocab_size)
    k, v = out.past_key_values[0]
    # [B, KV heads, prompt + image tokens + generated - 1, head_dim]
    assert k.shape == (2, cfg.num_kv_heads, w.prompt_length(cfg) + 3, cfg.head_dim)
    assert len(out.past_key_values) == cfg.num_layers


def test_outputs_are_deterministic(tiny_model):
    cfg = tiny_model.cfg
    w = Workload(prompt_tokens=8, new_tokens=3)
    a = generate(tiny_model, make_inputs(cfg, w, "cpu"), 3)
    b = generate(init_weights(XComposer(cfg), seed=0).eval(), make_inputs(cfg, w, "cpu"), 3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.last_logits, b.last_logits)
    c = generate(init_weights(XComposer(cfg), seed=1).eval(), make_inputs(cfg, w, "cpu"), 3)
    assert not torch.equal(a.last_logits, c.last_logits)


def test_kv_cache_decode_equals_full_recompute(tiny_model):
    cfg = tiny_model.cfg
    inputs = make_inputs(cfg, Workload(prompt_tokens=8), "cpu")
    with torch.no_grad():
        img = tiny_model.encode_img(inputs.pixels)
        emb, mask = tiny_model.wrap(inputs.input_ids, img)
        out = tiny_model(inputs_embeds=emb, im_mask=mask)
        nxt = out["logits"][:, -1].argmax(-1)
        step = tiny_model(input_ids=nxt[:, None], past_key_values=out["past_key_values"])
        full_emb = torch.cat([emb, tiny_model.model.tok_embeddings(nxt[:, None])], dim=1)
        full_mask = torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], dim=1)
        full = tiny_model(inputs_embeds=full_emb, im_mask=full_mask)
    torch.testing.assert_close(step["logits"][:, -1], full["logits"][:, -1], atol=1e-5, rtol=1e-5)


def test_plora_applies_only_on_image_tokens(tiny_model):
    lin = tiny_model.model.layers[0].attention.wqkv
    x = torch.randn(1, 4, lin.in_features)
    plain = torch.nn.functional.linear(x, lin.weight)
    with torch.no_grad():
        assert torch.equal(lin(x, None), plain)
        mask = torch.tensor([[False, True, False, False]])
        out = lin(x, mask)
    assert torch.equal(out[:, [0, 2, 3]], plain[:, [0, 2, 3]])
    assert not torch.allclose(out[:, 1], plain[:, 1])


def test_checkpoint_round_trip(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    spec = resolve_model(str(tmp_path / "ckpt"))
    loaded = spec.load_master()
    assert spec.config == tiny_model.cfg
    for (n1, p1), (n2, p2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    w = Workload(prompt_tokens=6, new_tokens=3)
    a = generate(tiny_model, make_inputs(tiny_model.cfg, w, "cpu"), 3)
    b = generate(loaded, make_inputs(loaded.cfg, w, "cpu"), 3)
    assert torch.equal(a.last_logits, b.last_logits)


def test_checkpoint_errors_are_bad_input(tmp_path, tiny_model):
    save_checkpoint(tiny_model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(BadInput, match="holds no weights"):
        resolve_model(str(tmp_path / "ckpt")).load_master()
    with pytest.raises(BadInput, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(BadInput, match="trust-remote-code"):
        load_remote("some/checkpoint", trust_remote_code=False)


def test_profile_units_in_execution_order(vl7b, tiny_hd):
    names = [u.name for u in vl7b.units]
    assert names[:3] == ["vit", "vision_proj", "model.tok_embeddings"]
    assert names[-2:] == ["model.norm", "output"]
    assert len(vl7b.layers) == 32
    assert vl7b.total_params == 8_666_840_064
    assert tiny_hd.root_parameters == ("plora_glb_GN", "plora_sub_GN")
    assert "plora_glb_GN" in tiny_hd.colocation
    assert profile_of(get_config("tiny")).total_params < 2_000_000  # a few MB
