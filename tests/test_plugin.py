"""Registration of the XATTN name: every way a user can select it, across processes."""
import importlib.metadata
import pickle
import subprocess
import sys
import textwrap

import pytest

import vllm_xattn  # noqa: F401  (registers XATTN)
from vllm.config import AttentionConfig
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_xattn.backends.xattn import XAttentionBackend


@pytest.mark.parametrize("name", ["XATTN", "xattn", "XAttn"])
def test_attention_config_accepts_name(name):
    cfg = AttentionConfig(backend=name)
    assert cfg.backend is AttentionBackendEnum.CUSTOM
    assert cfg.backend.get_class() is XAttentionBackend


def test_get_name_is_a_valid_enum_key():
    # vLLM's Attention layer does AttentionBackendEnum[backend.get_name()].
    assert AttentionBackendEnum[XAttentionBackend.get_name()] is AttentionBackendEnum.CUSTOM


def test_stock_backends_untouched():
    assert AttentionBackendEnum["FLASH_ATTN"].get_class().get_name() == "FLASH_ATTN"
    assert "XATTN" not in AttentionBackendEnum._member_names_  # alias, not a member


def test_entry_point_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "vllm_xattn.plugin:register" in {e.value for e in eps}


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_pickled_config_resolves_in_fresh_process_after_plugins_load():
    """Like a spawned EngineCore/worker: unpickle first, load plugins afterwards."""
    blob = pickle.dumps(AttentionConfig(backend="XATTN"))
    last = _run(
        f"""
        import pickle
        cfg = pickle.loads({blob!r})            # vllm_xattn not imported yet
        from vllm.plugins import load_general_plugins
        load_general_plugins()                  # what vLLM does in every process
        print(cfg.backend.name, cfg.backend.get_class().get_name())
        """
    )
    assert last == "CUSTOM XATTN"


def test_engine_args_name_via_plugin_loading():
    """`--attention-backend XATTN` / `LLM(attention_backend=...)`: plugins load in
    EngineArgs.__post_init__ before the name is validated."""
    last = _run(
        """
        from vllm.engine.arg_utils import EngineArgs
        from vllm.config import AttentionConfig
        args = EngineArgs(model="m", attention_backend="XATTN")  # loads plugins
        print(AttentionConfig.validate_backend_before(args.attention_backend).name)
        """
    )
    assert last == "CUSTOM"


def test_bad_config_rejected_at_engine_start():
    last = _run(
        """
        from vllm.engine.arg_utils import EngineArgs
        args = EngineArgs(model="m", attention_backend="XATTN",
                          additional_config={"xattn": {"stride": 7}})
        try:
            args.create_engine_config()
        except ValueError as e:
            print(repr(str(e)))
        """
    )
    assert "stride: Input should be 4, 8, 16 or 32 (got 7)" in last


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_import_from_any_directory(cwd, tmp_path):
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", "import vllm_xattn.backends.xattn, vllm_xattn.kernels; print('ok')"],
        cwd=repo if cwd == "repo" else tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
