# Sourced by demo.sh and test.sh: create (or reuse) .venv from requirements.txt, and make sure the
# Fashion-MNIST files of Debian's package dataset-fashion-mnist are there when apt can install them.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BASE_PYTHON=${BASE_PYTHON:-python3}
STAMP=.venv/.requirements.sha256
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$BASE_PYTHON" --version)"
  "$BASE_PYTHON" -m venv .venv
fi
if ! sha256sum --status -c "$STAMP" 2>/dev/null; then
  echo "==> installing requirements.txt into .venv (the first time takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements.txt
  sha256sum requirements.txt > "$STAMP"
fi
PYTHON=.venv/bin/python

FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "apt could not install dataset-fashion-mnist; download_dataset.py will try the Hugging Face Hub." >&2
  else
    echo "Fashion-MNIST is not in $FASHION_MNIST_DIR and apt is not usable here (needs root):" \
         "download_dataset.py will try the Hugging Face Hub; 'sudo apt-get install dataset-fashion-mnist' avoids that." >&2
  fi
fi
