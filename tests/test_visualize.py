import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_processor, tiny_config
from PIL import Image

import visualize
from models.vit_nepa import ViTNepaForImageClassification, ViTNepaForPreTraining


def save_pretraining_folder(path, **overrides):
    torch.manual_seed(0)
    ViTNepaForPreTraining(tiny_config(image_size=32, patch_size=8, **overrides)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    return save_pretraining_folder(tmp_path_factory.mktemp("causal"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A textured RGB photo-like picture saved as RGB, grayscale, RGBA, CMYK, palette and 16-bit files."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:60, 0:90]
    rgb = np.stack([xs * 2.8, ys * 4.2, rng.integers(0, 255, (60, 90))], axis=-1).astype(np.uint8)
    picture = Image.fromarray(rgb)
    paths = {
        "rgb": folder / "rgb.png",
        "gray": folder / "gray.png",
        "rgba": folder / "rgba.png",
        "cmyk": folder / "cmyk.jpg",
        "palette": folder / "palette.gif",
        "sixteen": folder / "sixteen.png",
    }
    picture.save(paths["rgb"])
    picture.convert("L").save(paths["gray"])
    picture.convert("RGBA").save(paths["rgba"])
    picture.convert("CMYK").save(paths["cmyk"])
    picture.convert("P").save(paths["palette"])
    Image.fromarray((ys * 1000).astype(np.uint16)).save(paths["sixteen"])
    assert Image.open(paths["cmyk"]).mode == "CMYK" and Image.open(paths["sixteen"]).mode == "I;16"
    return paths


def assert_not_blank(path, min_width=600):
    picture = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    height, width, _ = picture.shape
    assert width >= min_width and height >= 200
    assert picture.std() > 0


def run_model(folder, pixel_values):
    model = visualize.load_model(folder)
    with torch.no_grad():
        return model(pixel_values, output_attentions=True)


def test_maps_for_every_image_mode(causal_dir, images, tmp_path, capsys):
    out = tmp_path / "maps"
    image_args = [arg for path in images.values() for arg in ("--image", str(path))]
    written = visualize.main(["--model_name_or_path", str(causal_dir), "--output_dir", str(out)] + image_args)
    # 32 px at patch 8 is a 4x4 grid; the default query is the central patch, row 2 col 2 = index 10.
    assert sorted(path.name for path in written) == sorted(f"{name}_q10.png" for name in images)
    for path in written:
        assert_not_blank(path)
    assert "no preprocessor_config.json" in capsys.readouterr().out


def test_query_rowcol_is_raster_order_and_layer_all_heads_max_run(causal_dir, images, tmp_path):
    args = ["--model_name_or_path", str(causal_dir), "--image", str(images["rgb"]), "--output_dir", str(tmp_path)]
    (by_rowcol,) = visualize.main(args + ["--query_rowcol", "1,2", "--layer", "all", "--heads", "max"])
    (by_index,) = visualize.main(args + ["--query_index", "6", "--layer", "0"])
    assert by_rowcol.name == by_index.name == "rgb_q6.png"
    assert_not_blank(by_index)


@pytest.mark.parametrize("layer", [0, -1, "all"])
def test_attention_row_sums_to_one_and_is_causal(causal_dir, layer):
    outputs = run_model(causal_dir, torch.randn(2, 3, 32, 32))
    query = 5
    row = visualize.attention_map(outputs.attentions, query, layer, "mean")
    assert row.shape == (2, 17)
    torch.testing.assert_close(row.sum(-1), torch.ones(2))
    # Token 1 + query sees CLS and patches 0..query only.
    assert torch.all(row[:, 2 + query :] == 0)
    assert torch.all(row[:, : 2 + query] > 0)
    assert torch.all(visualize.attention_map(outputs.attentions, query, layer, "max")[:, 2 + query :] == 0)


def test_bidirectional_attention_reaches_later_patches(tmp_path):
    outputs = run_model(save_pretraining_folder(tmp_path, is_causal=False), torch.randn(1, 3, 32, 32))
    row = visualize.attention_map(outputs.attentions, 5, -1, "mean")
    torch.testing.assert_close(row.sum(-1), torch.ones(1))
    assert torch.all(row[:, 7:] > 0)


def test_similarity_at_the_next_patch_is_the_nepa_loss_term(causal_dir):
    pixel_values = torch.randn(1, 3, 32, 32)
    model = ViTNepaForPreTraining.from_pretrained(causal_dir).eval()
    with torch.no_grad():
        outputs = model(pixel_values)
    predictions, targets = outputs.last_hidden_state, outputs.input_embeddings
    similarity = torch.stack([visualize.next_embedding_similarity(predictions, targets, q)[0, q + 1] for q in range(15)])
    cls_term = F.cosine_similarity(predictions[0, 0], targets[0, 1], dim=0)
    # The loss averages cos(prediction t, target t + 1) over t = 0 (CLS) .. 15 (patch 14 predicting patch 15).
    torch.testing.assert_close(-(cls_term + similarity.sum()) / 16, outputs.loss)
    assert visualize.next_embedding_similarity(predictions, targets, 15).shape == (1, 16)


def test_classifier_folder_loads_its_encoder(tmp_path, images):
    classifier = ViTNepaForImageClassification(tiny_config(image_size=32, patch_size=8, num_labels=3, add_pooling_layer=True))
    classifier.save_pretrained(tmp_path / "cls")
    encoder = visualize.load_model(tmp_path / "cls")
    for name, tensor in classifier.vit_nepa.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], tensor, rtol=0, atol=0)
    args = ["--model_name_or_path", str(tmp_path / "cls"), "--image", str(images["rgb"]), "--layer", "all", "--heads", "max"]
    (path,) = visualize.main(args + ["--output_dir", str(tmp_path / "out")])
    assert_not_blank(path)


def test_folder_image_processor_sets_the_input_size(causal_dir, images, tmp_path, capsys):
    folder = tmp_path / "with_processor"
    folder.mkdir()
    for file in causal_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    save_processor(folder, 48)
    args = ["--model_name_or_path", str(folder), "--image", str(images["rgb"]), "--output_dir", str(tmp_path)]
    (path,) = visualize.main(args)
    assert path.name == "rgb_q21.png"  # 48 px: a 6x6 grid, central patch row 3 col 3
    assert "preprocessor_config.json (ViTImageProcessor" in capsys.readouterr().out


def test_training_curves(tmp_path):
    history = [
        {"step": 10, "loss": -0.2, "learning_rate": 1e-4, "grad_norm": 3.0, "target_cosine": 0.4},
        {"step": 20, "loss": -0.5, "learning_rate": 2e-4, "grad_norm": 2.0, "target_cosine": 0.3},
        {"step": 20, "eval_loss": 1.1, "eval_accuracy": 0.5},
        {"step": 30, "loss": -0.6, "learning_rate": 1e-4, "grad_norm": 1.5, "target_cosine": 0.3},
        {"step": 30, "eval_loss": 0.9, "eval_accuracy": 0.6},
        {"step": 30, "train_runtime": 12.0, "train_loss": -0.43},
    ]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 30, "log_history": history}))
    (path,) = visualize.main(["--trainer_state", str(state), "--output_dir", str(tmp_path / "plots")])
    assert path == tmp_path / "plots" / "training_curves.png"
    assert_not_blank(path)

    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": 0.5}]}))
    assert_not_blank(visualize.plot_training_curves(state, tmp_path), min_width=300)


def test_training_curves_errors(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        visualize.main(["--trainer_state", str(tmp_path / "missing.json"), "--output_dir", str(tmp_path)])
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"step": 5, "train_runtime": 1.0}]}))
    with pytest.raises(SystemExit, match="nothing to plot"):
        visualize.main(["--trainer_state", str(state), "--output_dir", str(tmp_path)])


def test_bad_inputs_give_clear_errors(causal_dir, images, tmp_path):
    out = ["--output_dir", str(tmp_path)]
    missing = tmp_path / "nope.jpg"
    with pytest.raises(SystemExit, match="cannot open image.*nope.jpg"):
        visualize.main(["--model_name_or_path", str(causal_dir), "--image", str(missing)] + out)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with pytest.raises(SystemExit, match="cannot open image.*notes.png"):
        visualize.main(["--model_name_or_path", str(causal_dir), "--image", str(not_an_image)] + out)
    with pytest.raises(SystemExit, match="hf download SixAILab/"):
        visualize.main(["--model_name_or_path", "SixAILab/nepa-base-patch14-224", "--image", str(images["rgb"])] + out)
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        visualize.load_model(tmp_path / "absent")
    with pytest.raises(SystemExit, match="outside the 16 patches"):
        visualize.main(["--model_name_or_path", str(causal_dir), "--image", str(images["rgb"]), "--query_index", "16"] + out)
    with pytest.raises(SystemExit, match="--layer must be"):
        visualize.main(["--model_name_or_path", str(causal_dir), "--image", str(images["rgb"]), "--layer", "2"] + out)


def test_incomplete_encoder_fails_loudly(causal_dir, tmp_path):
    folder = tmp_path / "affine"
    folder.mkdir()
    for file in causal_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["qk_norm_bias"] = True  # the saved tensors have no QK-norm biases
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks \d+ encoder tensors .*q_norm.bias"):
        visualize.load_model(folder)
