"""Smoke test of an installed vse_cuda (benchmarks/check_install.sh runs it in a fresh venv).

Run it from outside the source tree, so that `import vse_cuda` finds the installed copy:
    cd /tmp && VENV/bin/python /path/to/benchmarks/install_smoke.py
Checks: the package imports from site-packages, it requires the torch series it runs with, and a
triplet loss forward + backward on the CPU kernels matches the oracle. Prints one result line.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import torch

import vse_cuda
import vse_cuda.reference

SOURCE_TREE = Path(__file__).resolve().parent.parent


def main() -> int:
    package = Path(vse_cuda.__file__).resolve().parent
    if package.is_relative_to(SOURCE_TREE):
        print(f"install smoke: vse_cuda was imported from the source tree ({package}), not the install; "
              "run this script from another directory", file=sys.stderr)
        return 1
    series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    torch_requirements = [r for r in importlib.metadata.requires("vse_cuda") if r.startswith("torch")]
    if torch_requirements != [f"torch=={series}.*"]:
        print(f"install smoke: vse_cuda requires {torch_requirements} but runs with torch {torch.__version__}",
              file=sys.stderr)
        return 1

    generator = torch.Generator().manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(64, 32, generator=generator, dtype=torch.float64), dim=1)
                for _ in range(2))
    labels = torch.arange(64) // 2
    results = []
    for loss_fn in (vse_cuda.triplet_loss, vse_cuda.reference.triplet_loss):
        a, b = img.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = loss_fn(a, b, margin=0.2, mining="hardest", labels=labels)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    for name, ours, oracle in zip(("loss", "grad img", "grad txt"), *results):
        if not torch.allclose(ours, oracle, rtol=1e-10, atol=1e-12):
            print(f"install smoke: {name} differs from the oracle by {(ours - oracle).abs().max().item():.3g}",
                  file=sys.stderr)
            return 1
    print(f"install smoke ok: vse_cuda {vse_cuda.__version__} from {package}, torch {torch.__version__} "
          f"(requires {torch_requirements[0]}), backends {vse_cuda.backends()}, "
          f"triplet loss {results[0][0].item():.6f} and gradients match the oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
