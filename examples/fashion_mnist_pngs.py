"""Writes the first N images of the real Fashion-MNIST test set as PNG files, to try `trainer.predict` on.

    python examples/fashion_mnist_pngs.py --out images --count 4

Reads the IDX files where the mnist recipe finds them (Debian's dataset-fashion-mnist, the Keras cache);
each file is named <index>_<true class>.png, so the predictions can be checked by eye.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)

    from PIL import Image

    from trainer.data import load_mnist_format
    from trainer.recipes.images import FASHION_MNIST_CLASSES

    (_, _, images, labels), where = load_mnist_format("fashion_mnist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images[: args.count], labels[: args.count])):
        name = re.sub(r"[^A-Za-z0-9]+", "-", FASHION_MNIST_CLASSES[int(label)])
        Image.fromarray(image).save(out / f"{i:04d}_{name}.png")
    print(f"wrote {min(args.count, len(labels))} PNG files from {where} to {out}")


if __name__ == "__main__":
    main()
