"""Optional dependencies: imported where a feature needs them, failing there with the install command.

``import mask2former`` needs only the core dependencies (DESIGN.md, decision 9). A feature that needs an optional
package calls :func:`require` when it runs; without the package the user sees which feature needs what and the
``pip install 'mask2former[<extra>]'`` that provides it (the extras are those of ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level import name -> (the pyproject extra that installs it, its name on PyPI)
OPTIONAL_DEPENDENCIES: dict[str, tuple[str, str]] = {
    "accelerate": ("train", "accelerate"),
    "datasets": ("train", "datasets"),
    "pycocotools": ("train", "pycocotools"),
    "tensorboard": ("train", "tensorboard"),
    "onnx": ("export", "onnx"),
    "onnxscript": ("export", "onnxscript"),
    "onnxruntime": ("export", "onnxruntime"),
    "av": ("video", "av"),
}


def install_hint(module: str) -> str:
    """``pip install ...`` for the optional package that provides ``module`` (e.g. ``"pycocotools.mask"``)."""
    top_level = module.split(".")[0]
    if top_level not in OPTIONAL_DEPENDENCIES:
        raise KeyError(f"{top_level!r} is not an optional dependency of mask2former: {sorted(OPTIONAL_DEPENDENCIES)}")
    extra, distribution = OPTIONAL_DEPENDENCIES[top_level]
    return f"pip install 'mask2former[{extra}]' (or just `pip install {distribution}`)"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a dotted name such as ``"pycocotools.mask"``) for ``purpose``, or say how to install it.

    Args:
        module: the module to import; its top-level package must be listed in ``OPTIONAL_DEPENDENCIES``.
        purpose: what needs it, for the message (``"mask AP"``, ``"ONNX export"``).

    Returns:
        The imported module.

    Raises:
        ImportError: the package is not installed; the message names ``purpose`` and the install command.
    """
    hint = install_hint(module)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{purpose} needs `{module.split('.')[0]}`: {hint}") from error
