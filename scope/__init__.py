"""scope: mechanistic interpretability for Gemma-family language models."""

from scope.errors import ScopeError

__version__ = "0.1.0"
__all__ = ["ScopeError", "__version__"]
