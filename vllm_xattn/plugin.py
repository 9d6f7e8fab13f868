"""vLLM general plugin: makes ``XATTN`` a valid attention backend name.

vLLM validates ``--attention-backend`` with ``AttentionBackendEnum[name.upper()]``.
Configs are pickled into spawned EngineCore / worker processes *before* plugins
load there, and enum members pickle by value, so a newly injected enum member
would not survive. Instead the backend class is registered on the existing
``CUSTOM`` member and ``"XATTN"`` becomes an alias key of that member: both
pickle as ``CUSTOM`` and resolve to our class wherever this plugin has run
(entry point ``vllm.general_plugins``, and ``import vllm_xattn``).
"""
from __future__ import annotations

import functools

from vllm_xattn.config import CONFIG_KEY, parse_xattn_config

BACKEND_NAME = "XATTN"
BACKEND_PATH = "vllm_xattn.backends.xattn.XAttentionBackend"


def register_backend() -> None:
    """Register the backend class and the ``XATTN`` alias (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.attention.backends.registry import register_backend as vllm_register

    vllm_register(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    AttentionBackendEnum._member_map_.setdefault(BACKEND_NAME, AttentionBackendEnum.CUSTOM)


def _validate_at_engine_start() -> None:
    """Check ``additional_config["xattn"]`` before the engine config is built.

    This runs in the user's process (``LLM(...)``, ``vllm serve``) before any
    EngineCore is spawned, so a bad knob is a one-line error at start-up rather
    than a worker traceback. Workers parse the same dict again (cheap).
    """
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_xattn_wrapped", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        extra = self.additional_config
        if isinstance(extra, dict) and CONFIG_KEY in extra:
            parse_xattn_config(extra[CONFIG_KEY])
        return original(self, *args, **kwargs)

    create_engine_config._xattn_wrapped = True
    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    register_backend()
    _validate_at_engine_start()
