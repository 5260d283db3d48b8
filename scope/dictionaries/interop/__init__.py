"""Bringing dictionaries in and out: Gemma Scope releases, the SAELens folder layout, the Hugging Face hub.

One module per format, on a shared base:

- ``tensors.py``: the tensor names every format shares, the renames into scope's spelling, and building a
  dictionary from foreign tensors (shape and name checks).
- ``gemma_scope.py``: Gemma Scope 1 ``params.npz`` and Gemma Scope 2 folders, local or from the hub.
- ``saelens.py``: the SAELens folder layout, both ways.
- ``hub.py``: pushing and pulling dictionary folders, and the hub's failure modes.
- ``layout.py``: which layout a folder is in, and :func:`load_any` for all of them.

Import from here (``from scope.dictionaries.interop import load_any``); the names below are the public API.
"""

from scope.dictionaries.interop.gemma_scope import (GEMMA_SCOPE_2_CONFIG, GEMMA_SCOPE_2_WEIGHTS, GEMMA_SCOPE_NPZ,
                                                    load_gemma_scope)
from scope.dictionaries.interop.hub import pull_from_hub, push_to_hub
from scope.dictionaries.interop.layout import dictionary_layout, load_any
from scope.dictionaries.interop.saelens import (SAELENS_CONFIG, SAELENS_LAYOUT_VERSION, SAELENS_SPARSITY,
                                                SAELENS_WEIGHTS, from_saelens, to_saelens)

__all__ = ["GEMMA_SCOPE_2_CONFIG", "GEMMA_SCOPE_2_WEIGHTS", "GEMMA_SCOPE_NPZ", "SAELENS_CONFIG",
           "SAELENS_LAYOUT_VERSION", "SAELENS_SPARSITY", "SAELENS_WEIGHTS", "dictionary_layout", "from_saelens",
           "load_any", "load_gemma_scope", "pull_from_hub", "push_to_hub", "to_saelens"]
