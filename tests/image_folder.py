"""Small generated image folders for tests: `root/train/class_i/*.jpg`, `root/val/class_i/*.jpg`, and bad files."""

import io
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(
    root: Path,
    num_classes: int = 3,
    per_class: int = 4,
    size: tuple[int, int] = (40, 32),
    val_per_class: int = 2,
    seed: int = 0,
) -> Path:
    """Noisy JPEGs (width, height = size) around one mean colour per class, so a classifier can tell classes apart."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    class_colours = rng.uniform(40, 215, size=(num_classes, 3))
    for split, count in (("train", per_class), ("val", val_per_class)):
        for label, colour in enumerate(class_colours):
            class_dir = root / split / f"class_{label}"
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = colour + rng.normal(0, 20, size=(size[1], size[0], 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(class_dir / f"{index:04d}.jpg", quality=90)
    return root


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def add_bad_images(split_dir: Path) -> list[Path]:
    """Add awkward files to the first class folder of `split_dir`; return the paths of the undecodable ones.

    Undecodable: a truncated JPEG, an empty file, a text file named .jpg. Decodable but unusual: CMYK JPEG,
    16-bit grayscale PNG, grayscale JPEG, RGBA PNG, a 1x1 image and a 4000x3000 JPEG.
    """
    class_dir = sorted(path for path in Path(split_dir).iterdir() if path.is_dir())[0]
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))

    truncated, empty, text = class_dir / "bad_truncated.jpg", class_dir / "bad_empty.jpg", class_dir / "bad_text.jpg"
    whole = jpeg_bytes(noise)
    truncated.write_bytes(whole[: len(whole) // 2])
    empty.write_bytes(b"")
    text.write_text("this is not an image\n")

    Image.new("CMYK", (48, 40), (0, 128, 255, 30)).save(class_dir / "odd_cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, size=(40, 48), dtype=np.uint16)).save(class_dir / "odd_gray16.png")
    noise.convert("L").save(class_dir / "odd_gray.jpg")
    noise.convert("RGBA").save(class_dir / "odd_rgba.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(class_dir / "odd_1x1.png")
    # One colour encodes in a fraction of a second, and the decoder still has 12 megapixels to handle.
    Image.new("RGB", (4000, 3000), (90, 160, 60)).save(class_dir / "odd_large.jpg", quality=75)
    return [truncated, empty, text]
