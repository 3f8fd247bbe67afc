"""Behaviour of the ViT-NEPA model package: the released-file format, the forward pass of
the released model, the NEPA loss and its ablations, and the Transformers integration. Tiny configs, CPU, fp32
unless a test says otherwise."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_processor, tiny_config
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

from models.vit_nepa import (
    ViTNepaConfig,
    ViTNepaForImageClassification,
    ViTNepaForPreTraining,
    ViTNepaModel,
)
from models.vit_nepa.modeling_vit_nepa import (
    ViTNepaDropPath,
    ViTNepaRopePositionEmbedding,
    apply_rope_to_patches,
)

GRID = 4  # tiny_config: 32 px images, 8 px patches
PATCHES = GRID * GRID


def pixels(batch=2, height=32, width=32, channels=3, seed=0) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def build(model_class, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).eval()


def numbers_in_message(*numbers) -> str:
    """A `match` pattern that requires every number to appear in the message, in any order."""
    return "(?s)" + "".join(rf"(?=.*(?<![\d.]){re.escape(str(n))}(?![\d]))" for n in numbers)


def reference_nepa_loss(predictions, targets, shift=True):
    if shift:
        predictions, targets = predictions[:, :-1], targets[:, 1:]
    return -F.cosine_similarity(predictions, targets, dim=-1).mean()


# --------------------------------------------------------------------------------------------
# The released file format: the reference fixture and the released parameter table
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected_io(reference_fixture_dir):
    return load_file(reference_fixture_dir / "expected_io.safetensors")


def check_reproduces_fixture(model, expected_io):
    model.eval()
    pixel_values = expected_io["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values, output_attentions=True)  # eager attention
        sdpa_logits = model(pixel_values).logits
        last_hidden_state = model.vit_nepa(pixel_values).last_hidden_state
    torch.testing.assert_close(outputs.logits, expected_io["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa_logits, expected_io["logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(last_hidden_state, expected_io["last_hidden_state"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(outputs.attentions), expected_io["attentions"], atol=1e-5, rtol=0)


def test_reference_fixture_loads_cleanly_and_reproduces_outputs(reference_fixture_dir, expected_io):
    model, info = ViTNepaForImageClassification.from_pretrained(reference_fixture_dir, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    check_reproduces_fixture(model, expected_io)


def test_reference_fixture_through_auto_class(reference_fixture_dir, expected_io):
    model = AutoModelForImageClassification.from_pretrained(reference_fixture_dir)
    assert isinstance(model, ViTNepaForImageClassification)
    check_reproduces_fixture(model, expected_io)


def test_released_file_with_num_prompt_token_loads(reference_fixture_dir, expected_io, tmp_path):
    config = json.loads((reference_fixture_dir / "config.json").read_text())
    config["num_prompt_token"] = 0
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(reference_fixture_dir / "model.safetensors", tmp_path / "model.safetensors")
    model, info = ViTNepaForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    check_reproduces_fixture(model, expected_io)


def test_config_defaults_are_the_spec():
    config = ViTNepaConfig()
    spec = dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        use_gated_mlp=False, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.02, layer_norm_eps=1e-12, rope_theta=100.0, image_size=224, patch_size=16,
        num_channels=3, qkv_bias=True, qk_norm=False, qk_norm_bias=False, qk_norm_affine=False,
        layerscale_value=1e-5, drop_path_prob=0.0, add_pooling_layer=False, is_causal=True,
        pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=2.0,
        use_rope=True, nepa_shift=True, nepa_stop_grad=True, nepa_mask_ratio=0.0,
    )  # fmt: skip
    assert {name: getattr(config, name) for name in spec} == spec


@pytest.mark.parametrize("name", ["base", "large"])
def test_named_constructors_are_the_released_configs(name):
    released = json.loads((Path(__file__).resolve().parents[1] / "configs" / "pretrain" / f"nepa-{name}-patch14-224" / "config.json").read_text())
    built = getattr(ViTNepaConfig, f"nepa_{name}")().to_dict()
    assert {key: built.get(key) for key in released if key != "architectures"} == {
        key: value for key, value in released.items() if key != "architectures"
    }
    assert ViTNepaConfig.nepa_base(patch_size=16).patch_size == 16


def spec_parameter_shapes(config: ViTNepaConfig, head: str) -> dict[str, tuple[int, ...]]:
    """The released checkpoints' parameter names and shapes for `config`; head is "model", "pretraining" or "classifier"."""
    D, I, C, P = config.hidden_size, config.intermediate_size, config.num_channels, config.patch_size
    head_dim = D // config.num_attention_heads
    prefix = "" if head == "model" else "vit_nepa."
    shapes = {
        "embeddings.cls_token": (1, 1, D),
        "embeddings.patch_embeddings.projection.weight": (D, C, P, P),
        "embeddings.patch_embeddings.projection.bias": (D,),
        "layernorm.weight": (D,),
        "layernorm.bias": (D,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"encoder.layer.{i}."
        for norm in ("layernorm_before", "layernorm_after"):
            shapes[f"{layer}{norm}.weight"] = (D,)
            shapes[f"{layer}{norm}.bias"] = (D,)
        for projection in ("query", "key", "value"):
            shapes[f"{layer}attention.attention.{projection}.weight"] = (D, D)
            if config.qkv_bias:
                shapes[f"{layer}attention.attention.{projection}.bias"] = (D,)
        if config.qk_norm and config.qk_norm_affine:
            for norm in ("q_norm", "k_norm"):
                shapes[f"{layer}attention.attention.{norm}.weight"] = (head_dim,)
                if config.qk_norm_bias:
                    shapes[f"{layer}attention.attention.{norm}.bias"] = (head_dim,)
        shapes[f"{layer}attention.output.dense.weight"] = (D, D)
        shapes[f"{layer}attention.output.dense.bias"] = (D,)
        mlp_in = ("up_proj", "gate_proj") if config.use_gated_mlp else ("up_proj",)
        for projection in mlp_in:
            shapes[f"{layer}intermediate.{projection}.weight"] = (I, D)
            shapes[f"{layer}intermediate.{projection}.bias"] = (I,)
        shapes[f"{layer}output.dense.weight"] = (D, I)
        shapes[f"{layer}output.dense.bias"] = (D,)
        if config.layerscale_value is not None:
            shapes[f"{layer}layer_scale.lambda1"] = (D,)
            shapes[f"{layer}output.layer_scale.lambda1"] = (D,)
    shapes = {prefix + name: shape for name, shape in shapes.items()}
    if head == "classifier":
        if config.add_pooling_layer:
            shapes["fc_norm.weight"] = (D,)
            shapes["fc_norm.bias"] = (D,)
        shapes["classifier.weight"] = (config.num_labels, D)
        shapes["classifier.bias"] = (config.num_labels,)
    return shapes


ARCHITECTURE_VARIANTS = [
    dict(),
    dict(use_gated_mlp=True, hidden_act="silu"),
    dict(qk_norm=False),
    dict(qk_norm_affine=False),
    dict(qk_norm_bias=True),
    dict(layerscale_value=None),
    dict(add_pooling_layer=True),
    dict(qkv_bias=False),
]


@pytest.mark.parametrize("overrides", ARCHITECTURE_VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_parameter_names_and_shapes_match_spec_table(overrides):
    config = tiny_config(num_labels=5, **overrides)
    for head, model_class in [
        ("model", ViTNepaModel),
        ("pretraining", ViTNepaForPreTraining),
        ("classifier", ViTNepaForImageClassification),
    ]:
        model = model_class(config).eval()
        actual = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        expected = spec_parameter_shapes(config, head)
        assert actual == expected, (head, set(actual) ^ set(expected))

    with torch.no_grad():
        outputs = model(pixels(), labels=torch.tensor([0, 4]))
    assert outputs.logits.shape == (2, 5) and torch.isfinite(outputs.loss)


# --------------------------------------------------------------------------------------------
# Causality and the attention paths
# --------------------------------------------------------------------------------------------


def perturb_patch(pixel_values: torch.Tensor, k: int, patch_size: int = 8) -> torch.Tensor:
    """Add noise to the pixels of patch k (raster order) only."""
    row, col = divmod(k, pixel_values.shape[-1] // patch_size)
    perturbed = pixel_values.clone()
    rows = slice(row * patch_size, (row + 1) * patch_size)
    cols = slice(col * patch_size, (col + 1) * patch_size)
    perturbed[:, :, rows, cols] += torch.randn_like(perturbed[:, :, rows, cols])
    return perturbed


@pytest.mark.parametrize("path", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [0, 5, PATCHES - 1])
def test_causal_model_outputs_ignore_later_patches(path, k):
    # LayerScale None: at 1e-5 the attention branch would barely move the later positions.
    model = build(ViTNepaModel, layerscale_value=None, is_causal=True)
    assert model.config._attn_implementation == "sdpa"
    clean = pixels()
    torch.manual_seed(1)
    noisy = perturb_patch(clean, k)
    output_attentions = path == "eager"
    with torch.no_grad():
        before = model(clean, output_attentions=output_attentions).last_hidden_state
        after = model(noisy, output_attentions=output_attentions).last_hidden_state
    change = (after - before).abs().amax(dim=(0, 2))  # per position
    first_changed = 1 + k  # CLS is position 0
    assert torch.all(change[:first_changed] <= 1e-6), change
    assert torch.all(change[first_changed:] > 1e-3), change


@pytest.mark.parametrize("path", ["sdpa", "eager"])
def test_bidirectional_model_outputs_see_every_patch(path):
    model = build(ViTNepaModel, layerscale_value=None, is_causal=False)
    clean = pixels()
    torch.manual_seed(1)
    noisy = perturb_patch(clean, 5)
    output_attentions = path == "eager"
    with torch.no_grad():
        before = model(clean, output_attentions=output_attentions).last_hidden_state
        after = model(noisy, output_attentions=output_attentions).last_hidden_state
    change = (after - before).abs().amax(dim=(0, 2))
    assert torch.all(change > 1e-3), change


@pytest.mark.parametrize("is_causal", [True, False])
def test_eager_attention_probabilities(is_causal):
    model = build(ViTNepaModel, is_causal=is_causal)
    with torch.no_grad():
        attentions = model(pixels(), output_attentions=True).attentions
    assert len(attentions) == model.config.num_hidden_layers
    tokens = 1 + PATCHES
    for probs in attentions:
        assert probs.shape == (2, model.config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6, rtol=0)
        above_diagonal = probs[..., torch.ones(tokens, tokens, dtype=torch.bool).triu(1)]
        if is_causal:
            assert torch.all(above_diagonal == 0)
        else:
            assert torch.all(above_diagonal > 0)


@pytest.mark.parametrize("is_causal", [True, False])
def test_sdpa_gets_is_causal_and_no_materialised_mask(is_causal, monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model = build(ViTNepaModel, is_causal=is_causal)
    with torch.no_grad():
        outputs = model(pixels())
    assert outputs.attentions is None
    assert len(calls) == model.config.num_hidden_layers
    assert all(call.get("attn_mask") is None and call.get("is_causal") == is_causal for call in calls), calls


@pytest.mark.parametrize("is_causal", [True, False])
def test_sdpa_and_eager_agree(is_causal):
    model = build(ViTNepaForImageClassification, layerscale_value=None, is_causal=is_causal, add_pooling_layer=True)
    pixel_values = pixels()
    with torch.no_grad():
        sdpa = model.vit_nepa(pixel_values).last_hidden_state
        sdpa_logits = model(pixel_values).logits
        eager_requested = model.vit_nepa(pixel_values, output_attentions=True).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model.vit_nepa(pixel_values).last_hidden_state
        eager_logits = model(pixel_values).logits
    torch.testing.assert_close(eager_requested, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager_logits, sdpa_logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# The NEPA loss: shift, stop-gradient, masking
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False])
def test_loss_is_negative_cosine_of_prediction_and_shifted_target(shift):
    model = build(ViTNepaForPreTraining, nepa_shift=shift)
    with torch.no_grad():
        outputs = model(pixels())
    assert outputs.last_hidden_state.shape == outputs.input_embeddings.shape == (2, 1 + PATCHES, 32)
    expected = reference_nepa_loss(outputs.last_hidden_state, outputs.input_embeddings, shift=shift)
    other = reference_nepa_loss(outputs.last_hidden_state, outputs.input_embeddings, shift=not shift)
    torch.testing.assert_close(outputs.loss, expected, atol=1e-6, rtol=0)
    assert not torch.isclose(outputs.loss, other, atol=1e-4)


def test_input_embeddings_are_cls_and_patch_projections():
    model = build(ViTNepaModel)
    pixel_values = pixels()
    with torch.no_grad():
        targets = model(pixel_values).input_embeddings
        patches = model.embeddings.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
    torch.testing.assert_close(targets[:, 0], model.embeddings.cls_token[0].expand(2, -1))
    torch.testing.assert_close(targets[:, 1:], patches)


@pytest.mark.parametrize("stop_grad", [True, False])
def test_stop_gradient_on_targets(stop_grad):
    model = build(ViTNepaForPreTraining, nepa_stop_grad=stop_grad, layerscale_value=None)
    outputs = model(pixels())
    targets = outputs.input_embeddings
    (target_grad,) = torch.autograd.grad(outputs.loss, targets, retain_graph=True, allow_unused=True)
    if stop_grad:
        assert target_grad is None or torch.all(target_grad == 0)
    else:
        assert target_grad is not None and target_grad.abs().sum() > 0

    # The patch projection feeds both the predictions and the targets: its gradient tells which paths the loss used.
    weight = model.vit_nepa.embeddings.patch_embeddings.projection.weight
    (model_grad,) = torch.autograd.grad(outputs.loss, weight, retain_graph=True)
    prediction_only = reference_nepa_loss(outputs.last_hidden_state, targets.detach())
    (prediction_only_grad,) = torch.autograd.grad(prediction_only, weight, retain_graph=True)
    (both_paths_grad,) = torch.autograd.grad(reference_nepa_loss(outputs.last_hidden_state, targets), weight)
    assert not torch.allclose(prediction_only_grad, both_paths_grad, atol=1e-7)
    if stop_grad:
        expected, unexpected = prediction_only_grad, both_paths_grad
    else:
        expected, unexpected = both_paths_grad, prediction_only_grad
    torch.testing.assert_close(model_grad, expected, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(model_grad, unexpected, atol=1e-7)


def test_mask_ratio_masks_exact_count_of_patch_inputs_and_keeps_targets_clean():
    ratio = 0.3  # 0.3 * 16 = 4.8 -> 5 masked patches per image
    model = build(ViTNepaForPreTraining, nepa_mask_ratio=ratio, pos_embed_rescale=None)
    assert "vit_nepa.embeddings.mask_token" in model.state_dict()
    with torch.no_grad():
        model.vit_nepa.embeddings.mask_token.normal_()
    pixel_values = pixels(batch=4)
    with torch.no_grad():
        clean = model(pixel_values, output_hidden_states=True)
        model.train()
        torch.manual_seed(3)
        masked = model(pixel_values, output_hidden_states=True)

    # Eval: no masking, the encoder input is the target sequence.
    torch.testing.assert_close(clean.hidden_states[0], clean.input_embeddings, atol=0, rtol=0)
    encoder_input = masked.hidden_states[0]
    replaced = (encoder_input != masked.input_embeddings).any(dim=-1)  # (batch, 1 + patches)
    assert not replaced[:, 0].any(), "the CLS token is never masked"
    assert replaced[:, 1:].sum(dim=1).tolist() == [round(ratio * PATCHES)] * 4
    mask_token = model.vit_nepa.embeddings.mask_token[0, 0]
    assert torch.equal(encoder_input[replaced], mask_token.expand(int(replaced.sum()), -1))
    torch.testing.assert_close(masked.input_embeddings, clean.input_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(masked.loss, reference_nepa_loss(masked.last_hidden_state, clean.input_embeddings))


def test_no_mask_token_without_masking():
    model = build(ViTNepaForPreTraining)
    assert not any("mask_token" in name for name in model.state_dict())
    with pytest.raises(ValueError, match="mask"):
        model.vit_nepa(pixels(), bool_masked_pos=torch.zeros(2, PATCHES, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def test_rope_tables_follow_the_spec_formula():
    config = tiny_config(rope_theta=100.0)
    head_dim = config.hidden_size // config.num_attention_heads
    rope = ViTNepaRopePositionEmbedding(config).eval()
    rows, cols = 2, 3
    cos, sin = rope(rows, cols, device=torch.device("cpu"))
    inv_freq = [100.0 ** (-(j * 4 / head_dim)) for j in range(head_dim // 4)]
    for r in range(rows):
        for c in range(cols):
            y, x = (r + 0.5) / rows * 2 - 1, (c + 0.5) / cols * 2 - 1
            half = [2 * math.pi * y * f for f in inv_freq] + [2 * math.pi * x * f for f in inv_freq]
            angles = torch.tensor(half + half)
            torch.testing.assert_close(cos[r * cols + c], angles.cos(), atol=1e-6, rtol=0)
            torch.testing.assert_close(sin[r * cols + c], angles.sin(), atol=1e-6, rtol=0)


def test_rope_is_identity_on_cls_and_a_rotation_on_patches():
    config = tiny_config()
    cos, sin = ViTNepaRopePositionEmbedding(config).eval()(GRID, GRID, device=torch.device("cpu"))
    x = torch.randn(2, 4, 1 + PATCHES, 8)
    rotated = apply_rope_to_patches(x, cos, sin)
    assert torch.equal(rotated[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:])


def test_rope_dot_product_depends_only_on_relative_position():
    config = tiny_config()
    cos, sin = ViTNepaRopePositionEmbedding(config).eval()(GRID, GRID, device=torch.device("cpu"))
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def score(q_at, k_at):
        """q . k after RoPE, with q at patch (row, col) q_at and k at k_at on the 4x4 grid."""
        x = torch.zeros(1, 1, 1 + PATCHES, 8)
        q_token, k_token = 1 + q_at[0] * GRID + q_at[1], 1 + k_at[0] * GRID + k_at[1]
        x_q, x_k = x.clone(), x.clone()
        x_q[0, 0, q_token], x_k[0, 0, k_token] = q, k
        return apply_rope_to_patches(x_q, cos, sin)[0, 0, q_token] @ apply_rope_to_patches(x_k, cos, sin)[0, 0, k_token]

    base = score((0, 0), (1, 2))
    torch.testing.assert_close(score((2, 1), (3, 3)), base, atol=1e-5, rtol=0)  # both moved by (2, 1)
    torch.testing.assert_close(score((1, 1), (2, 3)), base, atol=1e-5, rtol=0)  # both moved by (1, 1)
    assert not torch.isclose(score((0, 0), (2, 1)), base, atol=1e-3)  # a different offset


def test_rope_shift_augmentation_keeps_patch_to_patch_scores():
    """The training-time shift moves every patch by the same offset: q . k between patches is unchanged
    (CLS is not rotated, so its scores with patches do see absolute positions)."""
    cpu = torch.device("cpu")
    rope = ViTNepaRopePositionEmbedding(tiny_config(pos_embed_shift=0.5, pos_embed_rescale=None))
    plain_tables = rope.eval()(GRID, GRID, cpu)
    torch.manual_seed(0)
    shifted_tables = rope.train()(GRID, GRID, cpu)
    assert not torch.allclose(shifted_tables[0], plain_tables[0])
    q, k = torch.randn(2, 4, 1 + PATCHES, 8), torch.randn(2, 4, 1 + PATCHES, 8)

    def patch_scores(tables):
        return (apply_rope_to_patches(q, *tables) @ apply_rope_to_patches(k, *tables).transpose(-1, -2))[..., 1:, 1:]

    torch.testing.assert_close(patch_scores(shifted_tables), patch_scores(plain_tables), atol=1e-5, rtol=0)


NO_AUGMENTATION = dict(pos_embed_shift=None, pos_embed_jitter=None, pos_embed_rescale=None)


@pytest.mark.parametrize(
    "augmentation",
    [dict(pos_embed_shift=0.2), dict(pos_embed_jitter=1.5), dict(pos_embed_rescale=2.0)],
    ids=lambda a: next(iter(a)),
)
def test_rope_coordinates_are_deterministic_in_eval_and_augmented_in_training(augmentation):
    rope = ViTNepaRopePositionEmbedding(tiny_config(**(NO_AUGMENTATION | augmentation)))
    plain = ViTNepaRopePositionEmbedding(tiny_config(**NO_AUGMENTATION))
    cpu = torch.device("cpu")
    rope.eval()
    reference = plain.eval()(GRID, GRID, cpu)
    for table, expected in zip(rope(GRID, GRID, cpu), reference):
        assert torch.equal(table, expected)
    for table, expected in zip(rope(GRID, GRID, cpu), reference):
        assert torch.equal(table, expected)

    rope.train()
    plain.train()
    torch.manual_seed(0)
    first, second = rope(GRID, GRID, cpu), rope(GRID, GRID, cpu)
    assert not torch.allclose(first[0], second[0])
    assert not torch.allclose(first[0], reference[0])
    # With every augmentation off, training mode is the plain grid.
    for table, expected in zip(plain(GRID, GRID, cpu), reference):
        assert torch.equal(table, expected)


# --------------------------------------------------------------------------------------------
# Absolute position embedding ablation, image sizes, pooling
# --------------------------------------------------------------------------------------------


def test_absolute_position_embedding_ablation():
    assert not any("position_embeddings" in name for name in build(ViTNepaModel).state_dict())
    model = build(ViTNepaForImageClassification, use_rope=False, add_pooling_layer=True)
    table = model.state_dict()["vit_nepa.embeddings.position_embeddings"]
    assert table.shape == (1, 1 + PATCHES, 32)
    with torch.no_grad():
        native = model(pixels(), output_hidden_states=True)
        other = model(pixels(height=48, width=24), output_hidden_states=True)
    assert native.logits.shape == other.logits.shape == (2, 2)
    assert other.hidden_states[-1].shape == (2, 1 + 6 * 3, 32)
    # The table is added to the encoder input.
    with torch.no_grad():
        targets = model.vit_nepa(pixels()).input_embeddings
    torch.testing.assert_close(native.hidden_states[0], targets + table)


@pytest.mark.parametrize("add_pooling_layer", [True, False])
def test_any_multiple_of_patch_size_runs_and_pooling_counts_actual_patches(add_pooling_layer):
    model = build(ViTNepaForImageClassification, add_pooling_layer=add_pooling_layer, num_labels=3)
    pixel_values = pixels(height=24, width=40)
    with torch.no_grad():
        logits = model(pixel_values).logits
        last_hidden_state = model.vit_nepa(pixel_values).last_hidden_state
        if add_pooling_layer:
            expected = model.classifier(model.fc_norm(last_hidden_state[:, 1:].mean(dim=1)))
        else:
            expected = model.classifier(last_hidden_state[:, -1])
    assert last_hidden_state.shape == (2, 1 + 3 * 5, 32)
    torch.testing.assert_close(logits, expected)

    pretraining = build(ViTNepaForPreTraining)
    with torch.no_grad():
        outputs = pretraining(pixel_values)
    assert outputs.last_hidden_state.shape == (2, 16, 32) and torch.isfinite(outputs.loss)


# --------------------------------------------------------------------------------------------
# Errors on bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(30, 32), (32, 36)])
def test_image_side_not_multiple_of_patch_size_raises(height, width):
    model = build(ViTNepaModel)
    bad_side = height if height % 8 else width
    with pytest.raises(ValueError, match=numbers_in_message(bad_side, 8)):
        model(pixels(height=height, width=width))


def test_wrong_channel_count_raises():
    model = build(ViTNepaForImageClassification)
    with pytest.raises(ValueError, match=numbers_in_message(1, 3)):
        model(pixels(channels=1))


def test_hidden_size_not_divisible_by_heads_raises():
    with pytest.raises(ValueError, match=numbers_in_message(30, 4)):
        tiny_config(hidden_size=30, num_attention_heads=4)


def test_patch_size_not_dividing_image_size_raises():
    with pytest.raises(ValueError, match=numbers_in_message(36, 8)):
        tiny_config(image_size=36)


def test_head_dim_not_divisible_by_four_raises_with_rope():
    with pytest.raises(ValueError, match=numbers_in_message(6)):
        tiny_config(hidden_size=24, num_attention_heads=4)
    tiny_config(hidden_size=24, num_attention_heads=4, use_rope=False)


def test_mask_ratio_out_of_range_raises():
    with pytest.raises(ValueError, match=numbers_in_message(1.0)):
        tiny_config(nepa_mask_ratio=1.0)


# --------------------------------------------------------------------------------------------
# Classification loss
# --------------------------------------------------------------------------------------------


def test_classification_loss_hard_and_soft_labels():
    model = build(ViTNepaForImageClassification, num_labels=3, add_pooling_layer=True)
    pixel_values = pixels(batch=3)
    labels = torch.tensor([2, 0, 1])
    with torch.no_grad():
        hard = model(pixel_values, labels=labels)
        one_hot = model(pixel_values, labels=F.one_hot(labels, 3).float())
        soft_labels = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
        soft = model(pixel_values, labels=soft_labels)
    torch.testing.assert_close(hard.loss, F.cross_entropy(hard.logits, labels))
    torch.testing.assert_close(one_hot.loss, hard.loss)
    expected_soft = -(soft_labels * F.log_softmax(soft.logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(soft.loss, expected_soft)


def test_classification_wrong_label_shape_raises():
    model = build(ViTNepaForImageClassification, num_labels=3)
    with pytest.raises(ValueError, match=numbers_in_message(2, 5, 3)):
        model(pixels(), labels=torch.rand(2, 5))


# --------------------------------------------------------------------------------------------
# Save / load, Auto classes, pipeline
# --------------------------------------------------------------------------------------------


def test_pretraining_round_trip_keeps_weights_outputs_and_ablation_fields(tmp_path):
    ablations = dict(nepa_shift=False, nepa_stop_grad=False, nepa_mask_ratio=0.25, use_rope=False, is_causal=False)
    model = build(ViTNepaForPreTraining, **ablations)
    with torch.no_grad():
        model.vit_nepa.embeddings.mask_token.normal_()
    model.save_pretrained(tmp_path)
    config = ViTNepaConfig.from_pretrained(tmp_path)
    assert {name: getattr(config, name) for name in ablations} == ablations
    loaded, info = ViTNepaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[name], loaded_state[name]) for name in original_state)
    loaded.eval()
    with torch.no_grad():
        before, after = model(pixels()), loaded(pixels())
    assert torch.equal(before.loss, after.loss)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)


def test_rope_model_round_trip_is_deterministic(tmp_path):
    """RoPE tables must not come from uninitialised buffers after `from_pretrained`."""
    model = build(ViTNepaForPreTraining, layerscale_value=None)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(pixels()).last_hidden_state
        for _ in range(2):
            loaded = ViTNepaForPreTraining.from_pretrained(tmp_path).eval()
            assert torch.equal(loaded(pixels()).last_hidden_state, expected)


@pytest.fixture
def saved_classifier(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "bird"}
    model = build(
        ViTNepaForImageClassification,
        layerscale_value=None,
        is_causal=False,
        add_pooling_layer=True,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    with torch.no_grad():  # a zero-mean random head gives near-uniform scores; make them distinct
        model.classifier.weight.normal_(std=1.0)
    model.save_pretrained(tmp_path)
    save_processor(tmp_path, 32)
    return model, tmp_path


def test_classifier_round_trip(saved_classifier):
    model, folder = saved_classifier
    loaded, info = ViTNepaForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.config.id2label == model.config.id2label
    with torch.no_grad():
        assert torch.equal(loaded.eval()(pixels()).logits, model(pixels()).logits)


def test_auto_classes_on_saved_folder(saved_classifier):
    model, folder = saved_classifier
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, ViTNepaConfig) and config.add_pooling_layer and not config.is_causal
    base = AutoModel.from_pretrained(folder).eval()
    classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(base) is ViTNepaModel and type(classifier) is ViTNepaForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(base(pixels()).last_hidden_state, model.vit_nepa(pixels()).last_hidden_state)
        torch.testing.assert_close(classifier(pixels()).logits, model(pixels()).logits)


def test_image_classification_pipeline_on_saved_folder(saved_classifier):
    model, folder = saved_classifier
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8))
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    results = classify(image)
    assert {result["label"] for result in results} == {"cat", "dog", "bird"}
    assert sum(result["score"] for result in results) == pytest.approx(1.0, abs=1e-5)

    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        probs = model(processor(image, return_tensors="pt")["pixel_values"]).logits.softmax(-1)[0]
    assert results[0]["label"] == model.config.id2label[int(probs.argmax())]
    assert results[0]["score"] == pytest.approx(float(probs.max()), abs=1e-4)


# --------------------------------------------------------------------------------------------
# Mixed precision, gradient checkpointing, drop path
# --------------------------------------------------------------------------------------------


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = build(ViTNepaForPreTraining, layerscale_value=None)
    pixel_values = pixels()
    with torch.no_grad():
        fp32 = model(pixel_values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixel_values)
            bf16_eager = model(pixel_values, output_attentions=True)
    for outputs in (bf16, bf16_eager):
        similarity = F.cosine_similarity(outputs.last_hidden_state.float(), fp32.last_hidden_state, dim=-1)
        assert similarity.min() > 0.99, similarity.min()
        assert abs(outputs.loss.item() - fp32.loss.item()) < 0.02
        assert outputs.loss.dtype == torch.float32
    for probs in bf16_eager.attentions:
        torch.testing.assert_close(probs.float().sum(-1), torch.ones(probs.shape[:-1]), atol=2e-2, rtol=0)

    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixel_values).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# The Trainer calls `activation_checkpointing_enable`; `gradient_checkpointing_enable` is its deprecated alias.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_gradient_checkpointing_gives_the_same_gradients(enable):
    # Dropout, drop path and RoPE augmentation all draw random numbers; checkpointing must replay them.
    overrides = dict(num_hidden_layers=3, drop_path_prob=0.3, hidden_dropout_prob=0.1, layerscale_value=None)
    gradients = []
    for checkpointing in (False, True):
        model = build(ViTNepaForPreTraining, **overrides).train()
        if checkpointing:
            getattr(model, enable)()
            assert model.is_activation_checkpointing
        torch.manual_seed(7)
        model(pixels(batch=4)).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_drop_path_rates_rise_linearly_over_layers():
    layers, top_rate, batch = 3, 0.6, 256
    model = build(ViTNepaModel, num_hidden_layers=layers, drop_path_prob=top_rate, pos_embed_rescale=None).train()
    observed = {i: [] for i in range(layers)}  # per layer: (dropped samples, samples)

    def record(layer_index):
        def hook(module, inputs, output):
            (branch,) = inputs
            dropped = (output == 0).flatten(1).all(dim=1)
            observed[layer_index].append((int(dropped.sum()), branch.shape[0]))
            if module.drop_prob > 0:  # survivors are rescaled by 1 / keep_prob
                kept = ~dropped
                torch.testing.assert_close(output[kept], branch[kept] / (1 - module.drop_prob), atol=0, rtol=1e-5)

        return hook

    for i, layer in enumerate(model.encoder.layer):
        drop_paths = [m for m in layer.modules() if isinstance(m, ViTNepaDropPath)]
        assert drop_paths, "each layer has a drop path"
        for module in drop_paths:
            module.register_forward_hook(record(i))
    torch.manual_seed(0)
    with torch.no_grad():
        model(pixels(batch=batch))
    for i, expected_rate in enumerate(np.linspace(0, top_rate, layers)):
        dropped = sum(d for d, _ in observed[i])
        total = sum(n for _, n in observed[i])
        assert total == 2 * batch  # the attention and the MLP branch
        assert dropped / total == pytest.approx(expected_rate, abs=0.07), (i, dropped / total)


def test_eval_mode_is_deterministic_with_every_regulariser_on():
    model = build(
        ViTNepaForPreTraining,
        drop_path_prob=0.5,
        hidden_dropout_prob=0.3,
        attention_probs_dropout_prob=0.3,
        pos_embed_shift=0.2,
        pos_embed_jitter=1.5,
        pos_embed_rescale=2.0,
        nepa_mask_ratio=0.5,
    )
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(pixels()).last_hidden_state
        torch.manual_seed(1)
        second = model(pixels()).last_hidden_state
        model.train()
        torch.manual_seed(1)
        training = model(pixels()).last_hidden_state
    assert torch.equal(first, second)
    assert not torch.allclose(training, first)
