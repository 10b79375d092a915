"""Training configuration: one dataclass, presets, and a command line generated from the fields.

The dataclass defaults are the official DINO v1 ViT-S/16 recipe (``main_dino.py``'s); a preset overrides some
of them and the command line overrides the preset. ``cpu-tiny`` carries the small-data settings the digits dataset
needs on a 2-core CPU (few prototypes, faster EMA, sharper teacher); ``vit-s16`` is the official recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

import torch

from dino.augment import MAX_GLOBAL_CROPS
from dino.checkpoint import CheckpointError
from dino.data import DataError

# Fields that only say how or where a run executes: they may differ when resuming, every other field must match the
# checkpoint's config (a different recipe would not continue the same loss curve).
RUNTIME_FIELDS = frozenset({"output_dir", "resume", "num_workers", "progress", "device", "eval_every", "data",
                            "debug", "cuda_graph"})
DEBUG_HELP = "on an error, show the Python traceback instead of the one-line message"
# The failures a user fixes on the command line (a bad path, a checkpoint that cannot be read or does not fit, an
# image folder without readable images): the CLIs report them in one line (:func:`run_command`).
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, DataError, OSError)


@dataclass
class Config:
    """Every option of ``python -m dino.train``; ``--help`` prints each with its default."""

    preset: str = field(default="auto", metadata={"help": "cpu-tiny (default on CPU), vit-s16 (default on GPU); "
                                                          "'auto' picks by device. Explicit options override it"})
    # ------------------------------------------------------------------ data
    data: str | None = field(default=None, metadata={
        "help": "folder of images (class sub-folders optional, used only for k-NN; train/ and val/ sub-folders are "
                "used as the split when present); default: scikit-learn's digits, upsampled, 70/30 stratified split"})
    image_size: int = field(default=256, metadata={"help": "base square size images are resized to (shorter side, then "
                                                           "centre crop), on the DataLoader workers; the digits once, "
                                                           "up front"})
    batch_size: int = field(default=64, metadata={"help": "images per process and step"})
    num_workers: int = field(default=8, metadata={"help": "DataLoader worker processes (decoding + base resize)"})
    # ------------------------------------------------------------------ multi-crop augmentation (DINO v1)
    global_size: int = field(default=224, metadata={"help": "side of the global crops"})
    local_size: int = field(default=96, metadata={"help": "side of the local crops"})
    n_global_crops: int = field(default=2, metadata={"help": "number of global crops G, the teacher's views: 1 or 2 "
                                                             "(the augmentation's two global views)"})
    n_local_crops: int = field(default=8, metadata={"help": "number of local crops L"})
    global_scale: tuple[float, float] = field(default=(0.4, 1.0), metadata={"help": "RandomResizedCrop area range, "
                                                                                     "global crops"})
    local_scale: tuple[float, float] = field(default=(0.05, 0.4), metadata={"help": "RandomResizedCrop area range, "
                                                                                    "local crops"})
    blur_sigma: tuple[float, float] = field(default=(0.1, 2.0), metadata={"help": "Gaussian blur sigma range in "
                                                                                  "pixels of the crop"})
    hflip_p: float = field(default=0.5, metadata={"help": "horizontal flip probability"})
    color_jitter_p: float = field(default=0.8, metadata={"help": "colour jitter probability (brightness 0.4, "
                                                                 "contrast 0.4, saturation 0.2, hue 0.1)"})
    grayscale_p: float = field(default=0.2, metadata={"help": "random grayscale probability"})
    solarize_p: float = field(default=0.2, metadata={"help": "solarisation probability of the second global view"})
    blur: bool = field(default=True, metadata={"help": "Gaussian blur (p = 1.0 / 0.1 / 0.5 in global 1 / global 2 / "
                                                       "local views); --no-blur turns it off in every view"})
    # ------------------------------------------------------------------ backbone
    patch_size: int = field(default=16, metadata={"help": "ViT patch size"})
    embed_dim: int = field(default=384, metadata={"help": "ViT width"})
    depth: int = field(default=12, metadata={"help": "ViT blocks"})
    num_heads: int = field(default=6, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / embed_dim"})
    n_registers: int = field(default=0, metadata={"help": "register tokens (DINOv2 'with registers'); 0 = none"})
    layerscale: float = field(default=0.0, metadata={"help": "LayerScale init value (DINOv2 uses 1e-5); 0 = off"})
    drop_path_rate: float = field(default=0.1, metadata={"help": "stochastic depth, linear 0 -> rate over the blocks"})
    # ------------------------------------------------------------------ head
    out_dim: int = field(default=65536, metadata={"help": "prototypes K (head output dimension)"})
    head_hidden_dim: int = field(default=2048, metadata={"help": "DINO head MLP hidden width"})
    head_bottleneck_dim: int = field(default=256, metadata={"help": "DINO head bottleneck before the l2-norm"})
    norm_last_layer: bool = field(default=True, metadata={"help": "freeze the weight-norm gain g of the last layer"})
    head_use_bn: bool = field(default=False, metadata={"help": "BatchNorm after the head's hidden layers (DINO's "
                                                               "--use_bn_in_head)"})
    freeze_last_layer: int = field(default=1, metadata={"help": "epochs during which the last layer gets no update"})
    # ------------------------------------------------------------------ optimisation
    epochs: int = field(default=100, metadata={"help": "training epochs"})
    base_lr: float = field(default=5e-4, metadata={"help": "peak lr for a total batch of 256 (scaled linearly)"})
    min_lr: float = field(default=1e-6, metadata={"help": "lr at the end of the cosine"})
    warmup_epochs: int = field(default=10, metadata={"help": "linear lr warmup epochs"})
    weight_decay: float = field(default=0.04, metadata={"help": "weight decay at the start (cosine)"})
    weight_decay_end: float = field(default=0.4, metadata={"help": "weight decay at the end (cosine)"})
    clip_grad: float = field(default=3.0, metadata={"help": "per-tensor gradient norm clip; 0 disables"})
    # ------------------------------------------------------------------ teacher and loss
    momentum_teacher: float = field(default=0.996, metadata={"help": "teacher EMA momentum at the start (cosine)"})
    momentum_teacher_end: float = field(default=1.0, metadata={"help": "teacher EMA momentum at the end"})
    teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature after the warmup"})
    warmup_teacher_temp: float = field(default=0.04, metadata={"help": "teacher temperature at epoch 0"})
    warmup_teacher_temp_epochs: int = field(default=0, metadata={"help": "epochs of linear teacher-temp warmup"})
    student_temp: float = field(default=0.1, metadata={"help": "student temperature"})
    center_momentum: float = field(default=0.9, metadata={"help": "center EMA momentum"})
    koleo_weight: float = field(default=0.0, metadata={"help": "weight of DINOv2's KoLeo regulariser on the student's "
                                                               "global-crop CLS features; 0 = off (DINO v1)"})
    # ------------------------------------------------------------------ DINOv2 objective
    recipe: str = field(default="dino", metadata={"help": "dino: DINO v1's objective; dinov2: adds the iBOT masked-"
                                                          "patch loss on block-masked global crops, Sinkhorn-Knopp "
                                                          "centering (see --centering) and DINOv2's loss weighting"})
    centering: str = field(default="softmax", metadata={"help": "teacher centering: softmax (the center EMA) or "
                                                                "sinkhorn_knopp (DINOv2, after --centering-warmup-"
                                                                "epochs of softmax centering)"})
    centering_warmup_epochs: int = field(default=0, metadata={"help": "epochs of softmax centering before "
                                                                      "Sinkhorn-Knopp takes over"})
    ibot_weight: float = field(default=1.0, metadata={"help": "weight of the iBOT masked-patch loss (recipe dinov2)"})
    ibot_separate_head: bool = field(default=False, metadata={"help": "a second head for the patch tokens (DINOv2's "
                                                                      "ibot.separate_head); else the DINO head"})
    mask_ratio: tuple[float, float] = field(default=(0.1, 0.5), metadata={"help": "range of the fraction of a masked "
                                                                                   "crop's patches that are masked"})
    mask_probability: float = field(default=0.5, metadata={"help": "fraction of the global crops that get a mask"})
    # ------------------------------------------------------------------ evaluation
    knn_k: int = field(default=20, metadata={"help": "k of the k-NN evaluation"})
    knn_temperature: float = field(default=0.07, metadata={"help": "temperature of the k-NN vote weights"})
    eval_every: int = field(default=1, metadata={"help": "k-NN evaluation every N epochs (and always at the end); "
                                                         "0 = only at the end"})
    # ------------------------------------------------------------------ run
    seed: int = field(default=0, metadata={"help": "random seed"})
    kernels: str = field(default="fused", metadata={"help": "fused: our kernels; reference: the same run on "
                                                            "plain PyTorch ops (A/B)"})
    amp: str = field(default="auto", metadata={"help": "autocast dtype: bf16, fp16 (with a GradScaler), none; "
                                                       "auto = bf16 on GPU, none on CPU"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N; auto = cuda when available"})
    output_dir: str | None = field(default=None, metadata={"help": "run directory (default runs/<date-time>; "
                                                                   "on --resume, the checkpoint's directory)"})
    resume: str | None = field(default=None, metadata={"help": "checkpoint file or run directory to continue"})
    cuda_graph: str = field(default="auto", metadata={"help": "replay each step's forward, losses and backward from "
                                                             "a CUDA graph: the same kernels without their launch "
                                                             "cost. on: needs one CUDA process, --recipe dino and no "
                                                             "fp16; auto = on for --kernels fused where it can be "
                                                             "(eager if the capture fails); off: eager"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per epoch (and while checking the "
                                                           "files of a large --data folder)"})
    debug: bool = field(default=False, metadata={"help": DEBUG_HELP})

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (lists for tuples), so a checkpoint loads with ``torch.load(weights_only=True)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        hints = get_type_hints(cls)
        return cls(**{k: tuple(v) if get_origin(hints[k]) is tuple else v for k, v in values.items()})

    def validate(self) -> None:
        if self.preset not in PRESETS and self.preset != "auto":
            raise ValueError(f"preset must be one of auto, {', '.join(PRESETS)}; got {self.preset!r}")
        if self.kernels not in ("fused", "reference"):
            raise ValueError(f"kernels must be 'fused' or 'reference'; got {self.kernels!r}")
        if self.cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be auto, on or off; got {self.cuda_graph!r}")
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp must be auto, bf16, fp16 or none; got {self.amp!r}")
        for name in ("global_size", "local_size", "patch_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(f"{name}={getattr(self, name)} must be a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        for name in ("batch_size", "epochs", "out_dim", "image_size", "knn_k", "depth", "n_global_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.n_local_crops < 0 or self.n_registers < 0 or self.num_workers < 0:
            raise ValueError("n_local_crops, n_registers and num_workers must be >= 0")
        if self.n_global_crops > MAX_GLOBAL_CROPS:
            raise ValueError(f"n_global_crops must be at most {MAX_GLOBAL_CROPS}: the multi-crop augmentation has "
                             f"{MAX_GLOBAL_CROPS} global views (DINO's two recipes); got {self.n_global_crops}")
        if self.n_global_crops + self.n_local_crops < 2:
            raise ValueError(f"the DINO loss pairs a teacher crop with another student crop: n_global_crops + "
                             f"n_local_crops must be >= 2; got {self.n_global_crops} + {self.n_local_crops}")
        if not 0 <= self.warmup_teacher_temp_epochs <= self.epochs:
            raise ValueError(f"warmup_teacher_temp_epochs must be in [0, epochs={self.epochs}]; got "
                             f"{self.warmup_teacher_temp_epochs}")
        if self.koleo_weight < 0 or (self.koleo_weight > 0 and self.batch_size < 2):
            raise ValueError(f"koleo_weight must be >= 0 and needs batch_size >= 2 (nearest neighbours); got "
                             f"koleo_weight={self.koleo_weight}, batch_size={self.batch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1); got {self.drop_path_rate}")
        for name in ("teacher_temp", "warmup_teacher_temp", "student_temp", "knn_temperature", "base_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.recipe not in ("dino", "dinov2"):
            raise ValueError(f"recipe must be 'dino' or 'dinov2'; got {self.recipe!r}")
        if self.centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'softmax' or 'sinkhorn_knopp'; got {self.centering!r}")
        if not 0 <= self.centering_warmup_epochs <= self.epochs:
            raise ValueError(f"centering_warmup_epochs must be in [0, epochs={self.epochs}]; got "
                             f"{self.centering_warmup_epochs}")
        if self.recipe == "dinov2" and self.n_global_crops != 2:
            raise ValueError(f"recipe dinov2 pairs the two global crops (DINOv2); got n_global_crops="
                             f"{self.n_global_crops}")
        if self.ibot_weight < 0:
            raise ValueError(f"ibot_weight must be >= 0; got {self.ibot_weight}")
        if not 0.0 <= self.mask_ratio[0] <= self.mask_ratio[1] <= 1.0:
            raise ValueError(f"mask_ratio must be a range 0 <= low <= high <= 1; got {self.mask_ratio}")
        for name in ("hflip_p", "color_jitter_p", "grayscale_p", "solarize_p", "mask_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability, in [0, 1]; got {getattr(self, name)}")
        for name in ("global_scale", "local_scale", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < low <= high; got {getattr(self, name)}")


PRESETS: dict[str, dict[str, Any]] = {
    # The official DINO v1 ViT-S/16 recipe: the dataclass defaults.
    "vit-s16": {},
    # Digits on a 2-core CPU in under 5 minutes. Small data changes the recipe; each choice below was measured on the
    # digits (benchmarks/results/learning-cpu-screen.md). Few prototypes, a fast teacher and a sharp teacher
    # temperature break the uniform fixed point that the official K=65536 / EMA 0.996 / temperature 0.04 sit at;
    # DINOv2's KoLeo term keeps the batch's CLS features apart (without it k-NN falls to 60 %). The crops are coarse:
    # 8-px global and 4-px local crops give the ViT 2x2 and 1x1 grids of 4-px patches (12- and 16-px globals, 3x3
    # and 4x4 grids, learned worse: 88 % and 73 % against 94 % at 30 epochs) and cheap steps, which pay for a wider
    # ViT (192). Blur stays, up to sigma 1 (without it 92.6 %); the colour operations go (the digits are grey), and
    # so do flips (digits are not mirror-symmetric). The 8x8 digits are upsampled to 16 px, the crops' source, once
    # and held in memory: no DataLoader worker, which would only take CPU time from the step on 2 cores (one worker:
    # 409 img/s, none: 443, the same losses); a --data folder to decode may want --num-workers.
    "cpu-tiny": {
        "image_size": 16, "global_size": 8, "local_size": 4, "n_local_crops": 6,
        "global_scale": (0.4, 1.0), "local_scale": (0.1, 0.4), "blur_sigma": (0.1, 1.0), "hflip_p": 0.0,
        "color_jitter_p": 0.0, "grayscale_p": 0.0, "solarize_p": 0.0,
        "batch_size": 64, "num_workers": 0,
        "patch_size": 4, "embed_dim": 192, "depth": 4, "num_heads": 6, "drop_path_rate": 0.1,
        "out_dim": 512, "head_hidden_dim": 512, "head_bottleneck_dim": 128,
        "epochs": 70, "base_lr": 1e-3, "warmup_epochs": 4, "min_lr": 1e-5,
        "momentum_teacher": 0.99, "momentum_teacher_end": 0.999,
        "teacher_temp": 0.02, "warmup_teacher_temp": 0.02, "koleo_weight": 0.1,
        "eval_every": 10,
    },
}
# DINOv2 (recipe dinov2: iBOT on block-masked global crops, Sinkhorn-Knopp centering, KoLeo, registers, LayerScale).
PRESETS["cpu-tiny-v2"] = {
    **PRESETS["cpu-tiny"], "recipe": "dinov2", "centering": "sinkhorn_knopp", "centering_warmup_epochs": 10,
    "n_registers": 1, "layerscale": 0.1,
}
# DINOv2's ViT-S/14 (ssl_default_config with the vits14 backbone) on one GPU: crops 224/98 at scales (0.32, 1) and
# (0.05, 0.32), K = 65,536 shared by the DINO and iBOT terms, 4 registers, LayerScale 1e-5, the head's gain trained,
# teacher temperature 0.04 -> 0.07 over 30 epochs, EMA 0.992 -> 1, weight decay 0.04 -> 0.2, KoLeo 0.1, iBOT 1.0,
# masks on half the global crops (10-50 % of their patches), Sinkhorn-Knopp centering (DINOv2's ViT-L/g configs).
# The lr rule stays DINO's linear base_lr · batch / 256; DINOv2's 4e-3 · sqrt(batch / 1024) gives the same 1e-3 at
# the batch of 64 per GPU.
PRESETS["vit-s14-v2"] = {
    "recipe": "dinov2", "patch_size": 14, "global_size": 224, "local_size": 98, "global_scale": (0.32, 1.0),
    "local_scale": (0.05, 0.32), "n_registers": 4, "layerscale": 1e-5, "norm_last_layer": False,
    "base_lr": 4e-3, "weight_decay_end": 0.2, "momentum_teacher": 0.992, "warmup_teacher_temp": 0.04,
    "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30, "koleo_weight": 0.1, "centering": "sinkhorn_knopp",
}


def default_preset() -> str:
    return "vit-s16" if torch.cuda.is_available() else "cpu-tiny"


def _cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


EXAMPLES = """examples:
  python -m dino.train                                # the default preset of this machine (digits, no download)
  python -m dino.train --data ~/photos --epochs 100   # any folder of images
  python -m dino.train --resume runs/<date-time>      # continue a run exactly where its checkpoint stopped
  python -m dino.train --kernels reference            # the same run on plain PyTorch ops (A/B)
  torchrun --nproc_per_node=2 -m dino.train           # DDP: NCCL on GPUs, gloo on CPU
"""


def build_parser(prog: str = "python -m dino.train", description: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one option per field; unset options stay ``None`` (the preset decides)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(Config)
    presets = {name: {**{f.name: f.default for f in fields(Config)}, **over} for name, over in PRESETS.items()}
    for f in fields(Config):
        hint = hints[f.name]
        helptext = f.metadata.get("help", "")
        if f.name != "preset":
            shown = {p: presets[p][f.name] for p in ("cpu-tiny", "vit-s16")}
            if shown["cpu-tiny"] != shown["vit-s16"]:
                helptext += f" [cpu-tiny: {_fmt(shown['cpu-tiny'])}, vit-s16: {_fmt(shown['vit-s16'])}]"
            else:
                helptext += f" [default: {_fmt(shown['vit-s16'])}]"
        else:
            helptext += " [default: auto]"
        kwargs: dict[str, Any] = {"default": None, "help": helptext, "dest": f.name}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is tuple:
            kwargs.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        else:
            base = [a for a in get_args(hint) if a is not type(None)] or [hint]
            kwargs["type"] = base[0]
        if f.name == "preset":
            kwargs["choices"] = ["auto", *PRESETS]
        elif f.name == "kernels":
            kwargs["choices"] = ["fused", "reference"]
        elif f.name == "recipe":
            kwargs["choices"] = ["dino", "dinov2"]
        elif f.name == "centering":
            kwargs["choices"] = ["softmax", "sinkhorn_knopp"]
        elif f.name == "amp":
            kwargs["choices"] = ["auto", "bf16", "fp16", "none"]
        elif f.name == "cuda_graph":
            kwargs["choices"] = ["auto", "on", "off"]
        parser.add_argument(_cli_name(f.name), **kwargs)
    return parser


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def explicit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (as field values)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if v is not None}


def resolve_config(overrides: dict[str, Any]) -> Config:
    """Dataclass defaults <- preset <- explicit overrides; ``output_dir`` defaults to ``runs/<date-time>``."""
    preset = overrides.get("preset") or "auto"
    name = default_preset() if preset == "auto" else preset
    if name not in PRESETS:
        raise ValueError(f"preset must be one of auto, {', '.join(PRESETS)}; got {preset!r}")
    values = {**PRESETS[name], **overrides, "preset": name}
    cfg = Config(**values)
    if cfg.output_dir is None and cfg.resume is None:
        cfg.output_dir = f"runs/{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    cfg.validate()
    return cfg


def parse_args(argv: list[str] | None = None) -> tuple[Config, dict[str, Any]]:
    """Parse ``argv`` into a validated config whose device this machine has; also returns the explicitly given
    options (for resume checks)."""
    parser = build_parser(description="DINO self-supervised training of a ViT on our fused kernels.")
    args = parser.parse_args(argv)
    overrides = explicit_overrides(args)
    try:
        cfg = resolve_config(overrides)
        check_device(cfg.device)
    except ValueError as err:
        parser.error(str(err))
    return cfg, overrides


def check_device(name: str) -> None:
    """ValueError unless ``name`` is ``auto`` or a device torch knows and, for CUDA, this machine has."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from err
    count = torch.cuda.device_count()
    if device.type == "cuda" and not 0 <= (device.index or 0) < count:  # torch wraps indices past 127 around
        raise ValueError(f"device {name!r}: torch sees {count} CUDA GPU(s) on this machine")


def run_command(command: Callable[[], Any], debug: bool, errors: tuple[type[Exception], ...] = ()) -> int:
    """Run a CLI's ``command`` and return its exit code: 0, or 2 (argparse's code for a bad command line) after
    printing a failure of :data:`USER_ERRORS` or ``errors`` as one ``error: ...`` line on stderr. With ``debug``
    those propagate with their traceback; any other exception is a bug and always does."""
    try:
        command()
    except (*USER_ERRORS, *errors) as err:
        if debug:
            raise
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        return 2
    return 0
