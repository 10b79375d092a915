"""``python -m dino.visualize --checkpoint PATH [--image PATH]``: DINO's self-attention figure.

The last block's attention from the CLS query to every patch, one panel per head (nearest-upsampled to pixels), and
a mask keeping the smallest set of patches that holds ``--threshold`` of the head-mean attention mass
(``visualize_attention.py``'s threshold). Default image: a held-out sample of the digits dataset.
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dino.augment import eval_transform  # noqa: E402
from dino.checkpoint import checkpoint_path  # noqa: E402
from dino.config import DEBUG_HELP, check_device, run_command  # noqa: E402
from dino.data import load_digits_arrays, read_image, resize_square, stratified_split, to_uint8_tensor  # noqa: E402
from dino.eval_knn import load_teacher_backbone  # noqa: E402


def threshold_mask(attn: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask (same shape as the 2-d ``attn``) of the smallest set of cells holding ``threshold`` of the mass."""
    flat = attn.flatten() / attn.sum()
    values, order = flat.sort(descending=True)
    keep_sorted = values.cumsum(0) - values < threshold  # a cell is kept if the mass before it is below threshold
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[keep_sorted]] = True
    return mask.reshape(attn.shape)


def sample_image(index: int) -> tuple[Image.Image, str]:
    images, labels = load_digits_arrays()
    _, test = stratified_split(labels)
    i = test[index % len(test)]
    return Image.fromarray(images[i], mode="L").convert("RGB"), f"digits test sample {index} (label {labels[i]})"


def attention_figure(backbone, image: Image.Image, size: int, threshold: float, title: str, path: str) -> None:
    """Write the figure for one image: input, head-mean attention, its threshold mask, then one panel per head."""
    size -= size % backbone.patch_size
    pixels = to_uint8_tensor(resize_square(image, size))
    device = next(backbone.parameters()).device
    x = eval_transform(pixels[None].to(device), size)
    attn = backbone.last_cls_attention(x)[0].float().cpu()  # (heads, h, w)
    p = backbone.patch_size
    up = attn.repeat_interleave(p, 1).repeat_interleave(p, 2)  # nearest upsampling, as DINO's figure
    mean = up.mean(0)
    mask = threshold_mask(attn.mean(0), threshold).repeat_interleave(p, 0).repeat_interleave(p, 1)
    heads = attn.shape[0]
    cols = max(3, heads)
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 5.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    rgb = pixels.permute(1, 2, 0).numpy()
    axes[0, 0].imshow(rgb)
    axes[0, 0].set_title("input", fontsize=9)
    axes[0, 1].imshow(mean.numpy(), cmap="inferno")
    axes[0, 1].set_title("CLS attention, head mean", fontsize=9)
    axes[0, 2].imshow((rgb * mask[..., None].numpy()).astype(np.uint8))
    axes[0, 2].set_title(f"mask: {threshold:.0%} of the mass", fontsize=9)
    for h in range(heads):
        axes[1, h].imshow(up[h].numpy(), cmap="inferno")
        axes[1, h].set_title(f"head {h}", fontsize=9)
    fig.suptitle(f"last-block CLS attention — {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """The CLI: an error the user can fix is one ``error: ...`` line and exit code 2 (with ``--debug``, its
    traceback)."""
    parser = argparse.ArgumentParser(prog="python -m dino.visualize", description=__doc__.split("\n\n")[1])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--image", default=None, help="image file (default: a held-out digits sample)")
    parser.add_argument("--sample", type=int, default=0, help="which digits test sample when --image is not given")
    parser.add_argument("--size", type=int, default=None, help="input side in pixels, rounded down to a multiple of "
                                                               "the patch size (default: 2 x the global crop size)")
    parser.add_argument("--threshold", type=float, default=0.6, help="attention mass kept by the mask (default 0.6)")
    parser.add_argument("--output", default=None, help="PNG path (default: attention.png next to the checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold must be in (0, 1]; got {args.threshold}")
    try:
        check_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    return run_command(lambda: visualize(args, parser), args.debug)


def visualize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Write the figure the parsed ``args`` ask for (``parser`` reports a ``--size`` below the patch size)."""
    backbone, cfg = load_teacher_backbone(args.checkpoint, torch.device(args.device))
    if args.image is None:
        image, title = sample_image(args.sample)
    else:
        image, title = read_image(args.image), os.path.basename(args.image)
    size = args.size or 2 * cfg.global_size
    if size < cfg.patch_size:
        parser.error(f"--size must be at least the patch size {cfg.patch_size}")
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(checkpoint_path(args.checkpoint))),
                                         "attention.png")
    attention_figure(backbone, image, size, args.threshold, title, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
