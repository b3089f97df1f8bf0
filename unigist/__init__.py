"""unigist: chunk-free gist-token compression (UniGist) for long-context LLMs.

Gist tokens are interleaved with the raw tokens, the model is trained in one
pass over that layout with a sparse mask, and at inference the raw tokens' KV
entries are really removed from the cache.
"""

from . import layout, reference
from .config import GistConfig
from .ops import gist_attention, has_cuda_kernels

__version__ = "0.1.0"

__all__ = ["GistConfig", "gist_attention", "has_cuda_kernels", "layout", "reference", "__version__"]
