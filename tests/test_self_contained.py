"""Saved folders travel: every folder the entry points write (pretraining, conversion, fine-tuning,
segmentation), and a released-format folder after `init_nepa_cls_from_pretrain.py --add_code_only`, loads in
a Python that has `transformers` but not this repository, with `trust_remote_code=True`, and gives the
outputs it gives here."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import COMMON, build_image_dataset, write_config_folder
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageClassification, UperNetForSemanticSegmentation

import download_dataset
import init_nepa_cls_from_pretrain
import train_finetune
import train_pretrain
import train_segmentation
from models.vit_nepa import AUTO_MAP, CODE_FILES, ViTNepaBackbone

REPO = Path(__file__).resolve().parents[1]
RUN = [*COMMON, "--seed", "0", "--max_steps", "2", "--save_strategy", "no", "--per_device_train_batch_size", "4"]

# Run by a Python started with -I (no PYTHONPATH, no current directory, no user site) in a folder outside the
# repository, with `models` and `nepa` made unimportable even if an editable install would find them.
LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys
    from pathlib import Path

    class NoProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("models", "nepa"):
                raise ImportError(f"{name} is this repository's code; the folder must not need it")

    sys.meta_path.insert(0, NoProject())
    repo = Path(sys.argv[1])
    assert not any(Path(entry or ".").resolve() == repo for entry in sys.path), sys.path

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, UperNetForSemanticSegmentation
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    torch.set_num_threads(1)
    folders = json.loads(sys.argv[2])
    inputs = load_file(sys.argv[3])
    outputs = {}
    with torch.no_grad():
        for name in ("pretrained", "converted", "finetuned", "released"):
            if name not in folders:
                continue
            pixels = inputs["released_pixel_values" if name == "released" else "pixel_values"]
            model = AutoModelForImageClassification.from_pretrained(folders[name], trust_remote_code=True).eval()
            if name != "pretrained":
                outputs[f"{name}.logits"] = model(pixels).logits
            encoder = AutoModel.from_pretrained(folders[name], trust_remote_code=True).eval()
            outputs[f"{name}.last_hidden_state"] = encoder(pixels).last_hidden_state
        pixels = inputs["pixel_values"]
        if "segmentation" in folders:
            # transformers builds a UperNet's backbone through AutoConfig / AutoBackbone: register the folder's classes.
            config_class = get_class_from_dynamic_module(AUTO_CONFIG, folders["segmentation"])
            backbone_class = get_class_from_dynamic_module(AUTO_BACKBONE, folders["segmentation"])
            AutoConfig.register("vit_nepa", config_class)
            AutoBackbone.register(config_class, backbone_class)
            model = UperNetForSemanticSegmentation.from_pretrained(folders["segmentation"]).eval()
            outputs["segmentation.logits"] = model(pixels).logits
            backbone = backbone_class.from_pretrained(folders["pretrained"], is_causal=False).eval()
            outputs["backbone.hidden_states"] = torch.stack(backbone(pixels, output_hidden_states=True).hidden_states)
    outputs["from_folder"] = torch.tensor(type(encoder).__module__.startswith("transformers_modules."))
    save_file({key: value.contiguous() for key, value in outputs.items()}, sys.argv[4])
    """
).replace("AUTO_CONFIG", repr(AUTO_MAP["AutoConfig"])).replace("AUTO_BACKBONE", repr(AUTO_MAP["AutoBackbone"]))


def load_without_the_repository(tmp_path: Path, folders: dict[str, Path], inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run LOADER in a fresh interpreter whose working directory and module cache are under tmp_path."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    save_file(inputs, workdir / "inputs.safetensors")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-I", "-c", LOADER, str(REPO),
        json.dumps({name: str(folder) for name, folder in folders.items()}),
        str(workdir / "inputs.safetensors"), str(workdir / "outputs.safetensors"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(workdir / "outputs.safetensors")


def add_code_to_released_folder(fixture_dir: Path, folder: Path) -> Path:
    shutil.copytree(fixture_dir, folder)
    init_nepa_cls_from_pretrain.main(["--pretrained_model_id", str(folder), "--add_code_only"])
    return folder


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory, reference_fixture_dir) -> dict[str, Path]:
    """Two steps each of pretraining, fine-tuning and segmentation, and a conversion, through the entry points;
    and the released-format fixture after `--add_code_only`."""
    root = tmp_path_factory.mktemp("travel")
    dataset = build_image_dataset(root, num_classes=2, per_class=4, val_per_class=2)
    config = write_config_folder(root / "config", num_hidden_layers=4)  # a backbone reads 4 blocks
    data = ["--dataset_name", str(dataset), "--load_from_disk", "True"]
    folders = {name: root / name for name in ("pretrained", "converted", "finetuned", "segmentation")}
    train_pretrain.main(["--config_name", str(config), *data, "--output_dir", str(folders["pretrained"]), "--do_train", *RUN])
    init_nepa_cls_from_pretrain.main([
        "--pretrained_model_id", str(folders["pretrained"]), "--dataset_name", str(dataset),
        "--save_local", "--local_dir", str(folders["converted"]),
    ])  # fmt: skip
    train_finetune.main(["--model_name_or_path", str(folders["converted"]), *data, "--output_dir", str(folders["finetuned"]), "--do_train", *RUN])
    canvases = download_dataset.main([
        "--dataset", "fashion-mnist-seg", "--canvas_size", "56", "--max_per_split", "4", "--output_dir", str(root / "canvases"),
    ]) if (download_dataset.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file() else None
    if canvases is None:
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")
    train_segmentation.main([
        "--model_name_or_path", str(folders["pretrained"]), "--dataset_name", str(canvases), "--load_from_disk", "True",
        "--output_dir", str(folders["segmentation"]), "--do_train", "--crop_size", "16", "--train_scale", "56", "56",
        "--decoder_hidden_size", "8", "--auxiliary_channels", "8", *RUN,
    ])  # fmt: skip
    folders["released"] = add_code_to_released_folder(reference_fixture_dir, root / "released")
    return folders


def test_every_saved_folder_loads_without_the_repository_and_gives_the_same_outputs(saved_folders, reference_fixture_dir, tmp_path):
    for folder in saved_folders.values():
        assert all((folder / name).is_file() for name in CODE_FILES), sorted(os.listdir(folder))
    for name in ("pretrained", "converted", "finetuned", "released"):
        assert json.loads((saved_folders[name] / "config.json").read_text())["auto_map"] == AUTO_MAP

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # The released fixture's own inputs, and the logits the release's code computed from them.
    released = load_file(reference_fixture_dir / "expected_io.safetensors")
    loaded = load_without_the_repository(tmp_path, saved_folders, {"pixel_values": pixels, "released_pixel_values": released["pixel_values"]})
    assert loaded.pop("from_folder")  # the classes came from the folder's files
    torch.testing.assert_close(loaded.pop("released.logits"), released["logits"], rtol=0, atol=1e-5)
    loaded.pop("released.last_hidden_state")

    expected = {}
    with torch.no_grad():
        for name in ("pretrained", "converted", "finetuned"):
            if name != "pretrained":
                expected[f"{name}.logits"] = AutoModelForImageClassification.from_pretrained(saved_folders[name]).eval()(pixels).logits
            expected[f"{name}.last_hidden_state"] = AutoModel.from_pretrained(saved_folders[name]).eval()(pixels).last_hidden_state
        segmentation = UperNetForSemanticSegmentation.from_pretrained(saved_folders["segmentation"]).eval()
        expected["segmentation.logits"] = segmentation(pixels).logits
        backbone = ViTNepaBackbone.from_pretrained(saved_folders["pretrained"], is_causal=False).eval()
        expected["backbone.hidden_states"] = torch.stack(backbone(pixels, output_hidden_states=True).hidden_states)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=key)


def test_converter_adds_only_the_code_and_auto_map_to_a_released_folder(reference_fixture_dir, tmp_path):
    folder = add_code_to_released_folder(reference_fixture_dir, tmp_path / "released")
    before = json.loads((reference_fixture_dir / "config.json").read_text())
    assert json.loads((folder / "config.json").read_text()) == {**before, "auto_map": AUTO_MAP}
    assert sorted(os.listdir(folder)) == sorted([*os.listdir(reference_fixture_dir), *CODE_FILES])


def test_add_code_only_refuses_conversion_flags_and_other_models(tmp_path, capsys):
    with pytest.raises(SystemExit):
        init_nepa_cls_from_pretrain.main(["--pretrained_model_id", str(tmp_path), "--add_code_only", "--num_labels", "3"])
    assert "--num_labels is used only" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(SystemExit, match="not a vit_nepa one"):
        init_nepa_cls_from_pretrain.main(["--pretrained_model_id", str(tmp_path), "--add_code_only"])
