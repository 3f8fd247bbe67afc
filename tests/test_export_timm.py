"""export_timm.py: a NEPA classifier or bidirectional encoder becomes a timm Eva that computes the same features
and logits (within 1e-5 in float32), loaded the way a timm user loads it; what Eva cannot compute exactly is
refused with the reason."""

import functools
import shutil

import pytest
import timm
import torch
from helpers import save_processor, tiny_config
from safetensors.torch import load_file, save_file

import export_timm
from models.vit_nepa import ViTNepaForImageClassification, ViTNepaForPreTraining, ViTNepaModel
from models.vit_nepa.modeling_vit_nepa import mean_patch_tokens

ATOL = 1e-5
SIZES = [(32, 32), (24, 40)]  # the native 4 x 4 patch grid, and another


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor away from its initial value (LayerScale 1e-5 would hide the blocks, zero biases the bias)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def load_timm(folder, eps: float = 1e-12) -> torch.nn.Module:
    """As the export tells a timm user to load it."""
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, norm_layer=functools.partial(timm.layers.LayerNorm, eps=eps))
    return model.eval()


def export(model, tmp_path):
    model.save_pretrained(tmp_path / "nepa")
    save_processor(tmp_path / "nepa")
    return export_timm.main(["--model_name_or_path", str(tmp_path / "nepa"), "--output_dir", str(tmp_path / "timm")])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(qk_norm_affine=False),  # the released NEPA-B: QK-norm without learned weights
        dict(use_gated_mlp=True, hidden_act="silu", qk_norm_bias=True),
        dict(layerscale_value=None, qkv_bias=False, qk_norm=False),
    ],
    ids=["released-l", "released-b", "gated", "plain"],
)
def test_classifier_features_and_logits_match(overrides, tmp_path):
    config = tiny_config(num_labels=5, is_causal=False, add_pooling_layer=True, **{"layerscale_value": 0.5, **overrides})
    nepa = randomised(ViTNepaForImageClassification(config))
    eva = load_timm(export(nepa, tmp_path))
    for height, width in SIZES:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected_features = nepa.vit_nepa(pixels).last_hidden_state
            torch.testing.assert_close(eva.forward_features(pixels), expected_features, rtol=0, atol=ATOL)
            torch.testing.assert_close(eva(pixels), nepa(pixels).logits, rtol=0, atol=ATOL)


def test_encoder_pooled_features_are_eval_py_features(tmp_path):
    nepa = randomised(ViTNepaModel(tiny_config(is_causal=False, layerscale_value=0.5)))
    eva = load_timm(export(nepa, tmp_path))
    assert eva.num_classes == 0
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(eva(pixels), mean_patch_tokens(nepa(pixels).last_hidden_state), rtol=0, atol=ATOL)


def test_released_classifier_gives_the_releases_logits(reference_fixture_dir, tmp_path):
    """The fixture was written by the release's code, with the logits the release computed."""
    expected = load_file(reference_fixture_dir / "expected_io.safetensors")
    shutil.copytree(reference_fixture_dir, tmp_path / "released")
    save_processor(tmp_path / "released")  # mean = std = 0.5, as the fixture's inputs were normalised
    folder = export_timm.main(["--model_name_or_path", str(tmp_path / "released"), "--output_dir", str(tmp_path / "timm")])
    eva = load_timm(folder)
    with torch.no_grad():
        torch.testing.assert_close(eva(expected["pixel_values"]), expected["logits"], rtol=0, atol=ATOL)
    assert list(eva.pretrained_cfg["mean"]) == [0.5, 0.5, 0.5]  # the folder's normalisation, for timm's data pipeline


@pytest.mark.parametrize(
    "model_class, overrides, named",
    [
        (ViTNepaForPreTraining, dict(), "causal"),
        (ViTNepaForImageClassification, dict(is_causal=False, add_pooling_layer=False), "last token"),
        (ViTNepaForImageClassification, dict(is_causal=False, add_pooling_layer=True, use_rope=False), "use_rope=False"),
        (ViTNepaForImageClassification, dict(is_causal=False, add_pooling_layer=True, hidden_dropout_prob=0.1), "dropout"),
        (ViTNepaForImageClassification, dict(is_causal=False, add_pooling_layer=True, hidden_act="relu"), "hidden_act 'relu'"),
    ],
)
def test_what_eva_cannot_compute_is_refused(model_class, overrides, named, tmp_path):
    model_class(tiny_config(num_labels=3, **overrides)).save_pretrained(tmp_path / "nepa")
    save_processor(tmp_path / "nepa")
    with pytest.raises(SystemExit, match=f"cannot export exactly to timm's Eva: .*{named}"):
        export_timm.main(["--model_name_or_path", str(tmp_path / "nepa"), "--output_dir", str(tmp_path / "timm")])
    assert not (tmp_path / "timm").exists()


def test_a_folder_without_its_image_processor_is_refused(tmp_path):
    ViTNepaForImageClassification(tiny_config(num_labels=3, is_causal=False, add_pooling_layer=True)).save_pretrained(tmp_path / "nepa")
    with pytest.raises(SystemExit, match="no preprocessor_config.json"):
        export_timm.main(["--model_name_or_path", str(tmp_path / "nepa"), "--output_dir", str(tmp_path / "timm")])


def test_training_mode_draws_the_same_rope_augmentation(tmp_path):
    """Shift, jitter and rescale of the RoPE coordinates: the same draws, in the same order, from the same seed."""
    config = tiny_config(num_labels=5, is_causal=False, add_pooling_layer=True, layerscale_value=0.5,
                         pos_embed_shift=0.2, pos_embed_jitter=1.3, pos_embed_rescale=2.0)  # fmt: skip
    nepa = randomised(ViTNepaForImageClassification(config))
    eva = load_timm(export(nepa, tmp_path))
    nepa.train(), eva.train()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        augmented = nepa.vit_nepa(pixels).last_hidden_state
        torch.manual_seed(1)
        torch.testing.assert_close(eva.forward_features(pixels), augmented, rtol=0, atol=ATOL)
        assert (augmented - nepa.eval().vit_nepa(pixels).last_hidden_state).abs().max() > 1e-2  # the draws did something


@pytest.mark.parametrize("model_class", [ViTNepaForImageClassification, ViTNepaForPreTraining])
def test_the_folders_ema_is_exported_unless_raw_weights_are_asked_for(model_class, tmp_path, capsys):
    """A fine-tuning (or pretraining) folder with model_ema.safetensors exports the EMA, the weights the recipe
    selects and reports; --raw_weights True exports model.safetensors; each run says which."""
    config = tiny_config(num_labels=5, is_causal=False, add_pooling_layer=True, layerscale_value=0.5)
    model = randomised(model_class(config))
    ema = randomised(model_class(config))
    with torch.no_grad():  # the EMA: other weights than the model's
        for parameter in ema.parameters():
            parameter.mul_(0.5)
    model.save_pretrained(tmp_path / "nepa")
    save_processor(tmp_path / "nepa")
    save_file({name: tensor.contiguous() for name, tensor in ema.state_dict().items()}, tmp_path / "nepa" / "model_ema.safetensors")
    pixels = torch.randn(2, 3, 32, 32)

    def exported_features(*flags):
        folder = export_timm.main(["--model_name_or_path", str(tmp_path / "nepa"), "--output_dir", str(tmp_path / "timm"), *flags])
        with torch.no_grad():
            return load_timm(folder).forward_features(pixels), capsys.readouterr().out

    with torch.no_grad():
        expected = {name: net.vit_nepa(pixels).last_hidden_state for name, net in (("ema", ema.eval()), ("raw", model))}
    features, said = exported_features()
    torch.testing.assert_close(features, expected["ema"], rtol=0, atol=ATOL)
    assert "exported the EMA weights (model_ema.safetensors)" in said
    features, said = exported_features("--raw_weights", "True")
    torch.testing.assert_close(features, expected["raw"], rtol=0, atol=ATOL)
    assert "exported the raw weights (model.safetensors)" in said
    (tmp_path / "nepa" / "model_ema.safetensors").unlink()
    features, said = exported_features()
    torch.testing.assert_close(features, expected["raw"], rtol=0, atol=ATOL)
    assert "the folder has no EMA weights" in said
