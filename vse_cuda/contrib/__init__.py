"""Drop-in replacements for other libraries' losses, computed by vse_cuda's kernels:
:mod:`vse_cuda.contrib.open_clip` (``ClipLoss``, ``SigLipLoss``)."""
