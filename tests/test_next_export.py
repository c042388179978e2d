"""Export of qwen3_next (Qwen3-Coder-Next): GGUF is refused before anything is written, with the reason naming
what is missing (the qwen3next tensor mapping), not the qwen3moe checks that do not apply to it.

    python -m pytest -q tests/test_next_export.py
"""

from __future__ import annotations

import pytest

pytest.importorskip("gguf")

from qwen_sft.export.gguf_export import GGUFExportError, export_gguf  # noqa: E402
from qwen_sft.export.gguf_export import main as gguf_main  # noqa: E402
from qwen_sft.model.tiny import TinySpec, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    spec = TinySpec(model_type="qwen3_next", layers=4, experts=16, active=10)
    return make_tiny_model(tmp_path_factory.mktemp("next-gguf") / "merged", spec, dtype="bfloat16")


def test_gguf_refuses_qwen3_next_naming_what_is_missing(next_dir, tmp_path, capsys):
    import gguf

    out = tmp_path / "next.gguf"
    with pytest.raises(GGUFExportError) as err:
        export_gguf(next_dir, out, progress=False)
    msg = str(err.value)
    assert "model_type='qwen3_next' (Qwen3-Coder-Next) is not exported" in msg
    for missing in ("Gated DeltaNet", "ssm_*", "shared expert", "ffn_*_shexp", "llama.cpp's logits"):
        assert missing in msg, missing
    # what the installed gguf knows is stated, not assumed
    knows = any(a.name == "QWEN3NEXT" for a in gguf.MODEL_ARCH)
    assert ("do define a qwen3next architecture" in msg) == knows
    assert "qwen2moe" not in msg and "mlp_only_layers" not in msg  # the qwen3moe-only checks do not apply
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    assert gguf_main([str(next_dir), str(out)]) == 1
    assert "Gated DeltaNet" in capsys.readouterr().err
