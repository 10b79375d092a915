"""``dino``: DINO self-supervised training of Vision Transformers on the ``dino_kernels`` ops.

Entry points:

- ``python -m dino.train``: train (CPU or GPU; ``torchrun --nproc_per_node=N -m dino.train`` for DDP);
- ``python -m dino.eval_knn --checkpoint PATH [--data DIR]``: k-NN top-1 of a checkpoint's teacher;
- ``python -m dino.eval_linear --checkpoint PATH [--data DIR]``: linear-probe top-1 of a checkpoint's teacher;
- ``python -m dino.visualize --checkpoint PATH [--image PATH]``: the last block's CLS attention maps.

Modules: :mod:`dino.config` (options and presets), :mod:`dino.data` (digits and image folders),
:mod:`dino.augment` (multi-crop augmentation on the device), :mod:`dino.model` (ViT and DINO head),
:mod:`dino.schedules`, :mod:`dino.checkpoint`, :mod:`dino.eval_knn`, :mod:`dino.eval_linear`, :mod:`dino.visualize`,
:mod:`dino.plots`.
The trainer depends on ``dino_kernels``; ``dino_kernels`` never imports ``dino``.
"""
