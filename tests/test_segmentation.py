"""Semantic segmentation: the ViT-NEPA backbone under UperNet, the confusion-matrix metrics, the
Fashion-MNIST canvases, and the training / evaluation entry points. Tiny models, CPU, fp32."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from models.vit_nepa import ViTNepaBackbone, ViTNepaConfig, ViTNepaForImageClassification, ViTNepaForPreTraining
from models.vit_nepa.configuration_vit_nepa import default_out_indices
from nepa.segmentation import confusion_matrix, reduce_across_processes, segmentation_metrics


def released_style_config(**overrides) -> ViTNepaConfig:
    """A tiny model in the released folders' format: patch 14, QK-norm with a learned weight, bidirectional."""
    values = dict(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=56,
        patch_size=14, qk_norm=True, qk_norm_affine=True, is_causal=False, add_pooling_layer=True,
    )  # fmt: skip
    values.update(overrides)
    return ViTNepaConfig(**values)


def pixels(batch=2, height=32, width=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def upernet(backbone_config: ViTNepaConfig, num_labels=5, seed=0) -> UperNetForSemanticSegmentation:
    torch.manual_seed(seed)
    config = UperNetConfig(
        backbone_config=backbone_config, num_labels=num_labels, hidden_size=16, auxiliary_channels=16
    )
    return UperNetForSemanticSegmentation(config)


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


def test_default_blocks_are_mae_and_beit_choice():
    assert ViTNepaConfig(num_hidden_layers=12).out_indices == [4, 6, 8, 12]
    assert ViTNepaConfig(num_hidden_layers=24).out_indices == [8, 12, 16, 24]
    assert ViTNepaConfig(num_hidden_layers=12).out_features == ["stage4", "stage6", "stage8", "stage12"]
    for depth in range(4, 40):
        blocks = default_out_indices(depth)
        assert len(set(blocks)) == 4 and blocks == sorted(blocks) and blocks[0] >= 1 and blocks[-1] == depth


@pytest.mark.parametrize("checkpoint_class", [ViTNepaForPreTraining, ViTNepaForImageClassification])
def test_backbone_loads_every_encoder_tensor(checkpoint_class, tmp_path):
    config = released_style_config(is_causal=checkpoint_class is ViTNepaForPreTraining, num_labels=7)
    torch.manual_seed(0)
    checkpoint = checkpoint_class(config)
    checkpoint.save_pretrained(tmp_path)
    backbone, info = ViTNepaBackbone.from_pretrained(tmp_path, is_causal=False, output_loading_info=True)
    encoder_keys = {f"vit_nepa.{name}" for name in checkpoint.vit_nepa.state_dict()}
    assert not encoder_keys & set(info["missing_keys"])
    assert all(key.startswith("neck.") for key in info["missing_keys"]), info["missing_keys"]
    assert set(info["unexpected_keys"]) <= {"fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias"}
    loaded = backbone.state_dict()
    for name, tensor in checkpoint.state_dict().items():
        if name.startswith("vit_nepa."):
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    assert not backbone.config.is_causal


def test_block_maps_at_224_px_are_the_encoders_hidden_states():
    config = released_style_config(image_size=224)
    torch.manual_seed(0)
    encoder = ViTNepaForPreTraining(config).vit_nepa.eval()
    backbone = ViTNepaBackbone(config).eval()
    backbone.vit_nepa.load_state_dict(encoder.state_dict())
    images = pixels(1, 224, 224)
    with torch.no_grad():
        maps, _ = backbone.block_feature_maps(images)
        reference = encoder(images, output_hidden_states=True)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 16, 16)] * 4
    for block, feature_map in zip(config.out_indices, maps):
        tokens = encoder.layernorm(reference.hidden_states[block][:, 1:])  # row-major patches, CLS dropped
        torch.testing.assert_close(feature_map.flatten(2).transpose(1, 2), tokens, rtol=0, atol=0)
    torch.testing.assert_close(maps[-1].flatten(2).transpose(1, 2), reference.last_hidden_state[:, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("patch_size, height, width", [(4, 32, 48), (14, 56, 84), (14, 504, 504)])
def test_pyramid_shapes(patch_size, height, width):
    config = released_style_config(patch_size=patch_size, image_size=56 if patch_size == 14 else 32)
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, ViTNepaBackbone) and backbone.channels == [32] * 4
    with torch.no_grad():
        maps = backbone(pixels(1, height, width)).feature_maps
    rows, cols = height // patch_size, width // patch_size
    expected = [(4 * rows, 4 * cols), (2 * rows, 2 * cols), (rows, cols), (rows // 2, cols // 2)]
    assert [tuple(m.shape[-2:]) for m in maps] == expected
    assert all(m.shape[:2] == (1, 32) for m in maps)


def test_stages_name_blocks_one_based():
    config = released_style_config(num_hidden_layers=6, out_indices=[1, 2, 4, 6])
    assert config.stage_names == ["stem"] + [f"stage{i}" for i in range(1, 7)]
    assert config.out_features == ["stage1", "stage2", "stage4", "stage6"]
    torch.manual_seed(0)
    backbone = ViTNepaBackbone(config).eval()
    images = pixels(1, 28, 28)
    with torch.no_grad():
        maps, _ = backbone.block_feature_maps(images)
        hidden = backbone.vit_nepa(images, output_hidden_states=True).hidden_states
        after_block_4 = backbone.vit_nepa.layernorm(hidden[4][:, 1:])
    assert len(hidden) == 7  # embeddings + 6 blocks
    torch.testing.assert_close(maps[2].flatten(2).transpose(1, 2), after_block_4, rtol=0, atol=0)
    by_features = ViTNepaConfig.from_dict({**config.to_dict(), "out_indices": None, "out_features": ["stage1", "stage2", "stage4", "stage6"]})
    assert by_features.out_indices == [1, 2, 4, 6]


def test_backbone_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="4 blocks.*out_indices is \\[2\\]"):
        ViTNepaBackbone(tiny_config())  # 2 blocks: the default is the last one alone
    with pytest.raises(ValueError, match="out_indices must be valid"):
        released_style_config(out_indices=[1, 2, 3, 9])
    backbone = ViTNepaBackbone(released_style_config())
    with pytest.raises(ValueError, match="50x56 is not a multiple of patch_size 14.*resize or crop"):
        backbone(pixels(1, 50, 56))


# --------------------------------------------------------------------------------------------
# UperNet on top
# --------------------------------------------------------------------------------------------


def test_upernet_forward_backward_ignores_ignore_pixels():
    model = upernet(released_style_config(patch_size=4, image_size=32)).train()
    images = pixels(2, 32, 48)
    labels = torch.randint(0, 5, (2, 32, 48), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    outputs = model(images, labels=labels)
    assert outputs.logits.shape == (2, 5, 32, 48)
    outputs.loss.backward()
    encoder_grads = [p.grad for n, p in model.backbone.named_parameters() if n.startswith("vit_nepa.encoder.")]
    assert all(g is not None and torch.isfinite(g).all() for g in encoder_grads)
    assert any(g.abs().sum() > 0 for g in encoder_grads)

    # The loss sees only labelled pixels: changing the ignored pixels' logits changes nothing.
    model.eval()
    with torch.no_grad():
        logits = model(images).logits
    changed = logits.clone()
    changed[:, :, :8] = torch.randn_like(changed[:, :, :8]) * 100
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(torch.nn.functional.cross_entropy(changed, labels, ignore_index=255), loss)


def test_upernet_save_load_round_trip(tmp_path):
    model = upernet(released_style_config(patch_size=4, image_size=32)).eval()
    model.save_pretrained(tmp_path)
    loaded, info = UperNetForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(loaded.backbone, ViTNepaBackbone)
    assert loaded.backbone.config.out_indices == model.backbone.config.out_indices
    images = pixels(1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images).logits, model(images).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Metrics from a confusion matrix
# --------------------------------------------------------------------------------------------


def test_confusion_matrix_and_metrics_worked_by_hand():
    labels = torch.tensor([[0, 0, 1], [1, 2, 255]])
    predictions = torch.tensor([[0, 1, 1], [1, 2, 0]])  # the last pixel is ignored whatever it predicts
    confusion = confusion_matrix(predictions, labels, num_labels=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]  # rows: true class, columns: predicted
    metrics = segmentation_metrics(confusion, {0: "sky", 1: "road", 2: "car"})
    # IoU = diagonal / (row + column - diagonal): sky 1/(2+1-1), road 2/(2+3-2), car 1/(1+1-1)
    assert metrics["iou_sky"] == pytest.approx(1 / 2)
    assert metrics["iou_road"] == pytest.approx(2 / 3)
    assert metrics["iou_car"] == pytest.approx(1.0)
    assert metrics["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 5)
    assert metrics["mean_accuracy"] == pytest.approx((1 / 2 + 1 + 1) / 3)


def test_classes_absent_from_labels_and_predictions_are_left_out():
    labels = torch.zeros(1, 2, dtype=torch.long)
    predictions = torch.tensor([[0, 3]])
    metrics = segmentation_metrics(confusion_matrix(predictions, labels, num_labels=4))
    # class 0: 1 / (2 + 1 - 1); class 3 predicted but never true: IoU 0, counted; classes 1 and 2: nowhere
    assert metrics["mean_iou"] == pytest.approx((1 / 2 + 0) / 2)
    assert set(metrics) == {"mean_iou", "mean_accuracy", "pixel_accuracy", "iou_0", "iou_3"}
    assert metrics["mean_accuracy"] == pytest.approx(1 / 2)  # class 3 has no true pixel: no accuracy


def test_confusion_matrix_accumulates_over_batches():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (6, 8, 8), generator=generator)
    labels[labels == 4] = 255
    predictions = torch.randint(0, 4, (6, 8, 8), generator=generator)
    whole = confusion_matrix(predictions, labels, 4)
    parts = sum(confusion_matrix(p, l, 4) for p, l in zip(predictions.split(2), labels.split(2)))
    assert torch.equal(whole, parts)
    assert int(whole.sum()) == int((labels != 255).sum())


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match="label 7 is outside 0..3.*--reduce_labels"):
        confusion_matrix(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 7]]), num_labels=4)


def _reduce_in_process(rank, world_size, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results.put((rank, reduce_across_processes(torch.full((2, 2), rank + 1, dtype=torch.int64)).tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_confusion_matrices_are_summed_across_processes():
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("fork")  # the children inherit the imports: no second start-up
    results = context.Queue()
    processes = [context.Process(target=_reduce_in_process, args=(rank, 2, port, results)) for rank in range(2)]
    for process in processes:
        process.start()
    gathered = dict(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert gathered == {0: [[3, 3], [3, 3]], 1: [[3, 3], [3, 3]]}
