"""transformers stays optional: the conversion imports only torch, safetensors and tokenizers at
module level (huggingface_hub and transformers inside the functions that need them), and an
import runs in a process where transformers cannot be imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from hf_checkpoints import hf_config, hf_model, save_checkpoint
import bam_pipeline.interop

INTEROP = Path(bam_pipeline.interop.__file__).parent
MODULE_LEVEL = {"torch", "safetensors", "tokenizers", "bam_pipeline"}
LAZY = {"huggingface_hub", "transformers", "gguf"}


def test_third_party_imports_at_module_level_are_the_conversions_only():
    found = {}
    for path in sorted(INTEROP.glob("*.py")):
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    root = name.split(".")[0]
                    if root not in sys.stdlib_module_names and root != "__future__":
                        found.setdefault(root, set()).add("module" if node in top else "function")
    assert {m for m, where in found.items() if "module" in where} <= MODULE_LEVEL
    assert set(found) <= MODULE_LEVEL | LAZY
    assert found.get("transformers") == {"function"} and found.get("huggingface_hub") == {"function"}


def test_an_import_runs_without_transformers(tmp_path):
    path = save_checkpoint(hf_model(hf_config("qwen2")), tmp_path / "qwen2")
    script = (
        "import sys; sys.modules['transformers'] = None\n"
        "from bam_pipeline.interop import import_hf_model, load_hf_model_tokenizer\n"
        f"ck = import_hf_model({str(path)!r})\n"
        f"tok = load_hf_model_tokenizer(ck.hf_model_dir, ck.config.vocab_size)\n"
        "assert 'transformers' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n"
        "print(ck.architecture, tok.eos_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["Qwen2ForCausalLM", "2"]
