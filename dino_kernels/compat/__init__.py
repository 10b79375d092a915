"""Drop-in classes with other projects' signatures, running on dino_kernels' ops.

- :mod:`dino_kernels.compat.dinov2`: DINOv2's ``DINOLoss``, ``iBOTPatchLoss`` and ``KoLeoLoss``.
"""
