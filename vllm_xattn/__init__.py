"""vllm-xattn: XAttention block-sparse prefill as a vLLM attention backend (``XATTN``).

Importing the package registers the backend, so ``AttentionConfig(backend="XATTN")``
works even before vLLM has loaded its plugins.
"""
import os as _os

# The sources of the subpackages ``vllm_xattn.backends`` and ``vllm_xattn.kernels``
# live in the top-level folders ``backends/`` and ``kernels/`` (see pyproject.toml).
# An installed wheel has them inside this package; a source checkout imported from
# the repo root (or a non-editable install shadowed by it) does not, so let the
# package also search the repo root for its subpackages.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "backends")) and _os.path.isfile(
    _os.path.join(_root, "backends", "__init__.py")
):
    __path__.append(_root)

__version__ = "0.1.0"

from vllm_xattn.plugin import register as _register  # noqa: E402

_register()
