"""Drop-in classes with other projects' signatures, running on dino_kernels' ops.

- :mod:`dino_kernels.compat.dino`: the official DINO ``DINOLoss`` (facebookresearch/dino ``main_dino.py``).
- :mod:`dino_kernels.compat.dinov2`: DINOv2's ``DINOLoss``, ``iBOTPatchLoss`` and ``KoLeoLoss``.
- :mod:`dino_kernels.compat.lightly`: lightly's ``DINOLoss`` (``lightly.loss``).

Their teacher EMA loops (and timm's ``ModelEmaV3``) become :func:`dino_kernels.ema_`: see its docstring.
"""
