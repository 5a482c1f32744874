#!/usr/bin/env bash
# Make Fashion-MNIST's four IDX files available and print the directory that holds them.
# Order: $FASHION_MNIST_DIR (a directory you name) -> Debian package `dataset-fashion-mnist` (apt, as root
# or with sudo) -> torchvision's download into ./data/fashion-mnist (needs network access).
set -euo pipefail
files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
has_all() { for f in "${files[@]}"; do [[ -e "$1/$f" || -e "$1/$f.gz" ]] || return 1; done; }

if [[ -n "${FASHION_MNIST_DIR:-}" ]]; then
  has_all "$FASHION_MNIST_DIR" || { echo "FASHION_MNIST_DIR=$FASHION_MNIST_DIR lacks the IDX files" >&2; exit 1; }
  echo "$FASHION_MNIST_DIR"; exit 0
fi
deb=/usr/share/datasets/fashion-mnist
if has_all "$deb"; then echo "$deb"; exit 0; fi
if command -v apt-get >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo -n"
  if [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
    { $SUDO apt-get install -y -qq dataset-fashion-mnist || { $SUDO apt-get update -qq && \
      $SUDO apt-get install -y -qq dataset-fashion-mnist; }; } >&2 || true
    if has_all "$deb"; then echo "$deb"; exit 0; fi
  fi
fi
out=data/fashion-mnist
if has_all "$out/FashionMNIST/raw"; then echo "$out/FashionMNIST/raw"; exit 0; fi
echo "Debian package unavailable; trying torchvision's download into $out" >&2
"${PYTHON:-.venv/bin/python}" -c "import torchvision,sys; torchvision.datasets.FashionMNIST('$out', download=True)" >&2 \
  || { echo "could not get Fashion-MNIST: set FASHION_MNIST_DIR to a directory with the IDX files" >&2; exit 1; }
echo "$out/FashionMNIST/raw"
