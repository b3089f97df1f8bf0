"""unigist: chunk-free gist-token compression (UniGist) for long-context LLMs.

Gist tokens are interleaved with the raw tokens, the model is trained in one
pass over that layout with a sparse mask, and at inference the raw tokens' KV
entries are really removed from the cache.
"""

from . import layout
from .cache import GistCache
from .config import GistConfig
from .data import GistCollator, gist_batch
from .generation import GenerationResult, generate
from .hf import patch_model, unpatch_model
from .ops import evict_kv, gist_attention, has_cuda_kernels

__version__ = "0.1.0"

__all__ = [
    "GistConfig",
    "gist_attention",
    "evict_kv",
    "has_cuda_kernels",
    "patch_model",
    "unpatch_model",
    "GistCollator",
    "gist_batch",
    "GistCache",
    "generate",
    "GenerationResult",
    "layout",
    "reference",
    "__version__",
]


def __getattr__(name: str):
    # The dense-mask reference is the tests' oracle, not part of any production path:
    # loaded only when asked for (``unigist.reference`` or ``import unigist.reference``).
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
