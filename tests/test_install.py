"""`pip install -e .` (pyproject.toml) makes `models.vit_nepa` and `nepa` importable from any directory."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_imports_the_packages_from_anywhere(tmp_path):
    # Into a prefix of its own, so the shared environment is left alone; --no-deps: they are installed already.
    install = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        "--prefix", str(tmp_path / "prefix"), "--editable", str(REPO),
    ]  # fmt: skip
    result = subprocess.run(install, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    site_dir = sysconfig.get_path("purelib", vars={"base": str(tmp_path / "prefix"), "platbase": str(tmp_path / "prefix")})
    # -I: neither PYTHONPATH nor the working directory (outside the repository) is on sys.path; the
    # install's .pth file, read by addsitedir as it would be in site-packages, is the only way in.
    probe = (
        f"import site; site.addsitedir({site_dir!r}); "
        "import models.vit_nepa, nepa.data; "
        "print(models.vit_nepa.__file__); print(nepa.data.__file__); print(models.vit_nepa.ViTNepaConfig.model_type)"
    )
    result = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [
        str(REPO / "models" / "vit_nepa" / "__init__.py"), str(REPO / "nepa" / "data.py"), "vit_nepa"
    ]
