"""The README's Python blocks run as written: the Quickstart, then "Saving and reloading" and
"PEFT / LoRA", which continue it, in one fresh interpreter (a scratch working directory), with
checks between them that they do what the text says."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(section: str) -> str:
    """The first ```python block of the README section titled ``section``."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    m = re.search(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)
    assert m, f"no python block in README section {section!r}"
    return m.group(1)


CHECK_QUICKSTART = """
assert loss.grad_fn is None or loss.requires_grad
assert result.kv["cache_length"] < result.kv["seen_tokens"], result.kv   # the cache really evicted
assert 1 <= len(result.ids) <= 16 and isinstance(result.text, str)  # a random model may hit </s> early
_before = unigist.generate(model, tokenizer, "the cat sat on the mat", max_new_tokens=8, progress=False).text
print("QUICKSTART OK")
"""

CHECK_RELOAD = """
assert unigist.hf.is_patched(model) and model.config._attn_implementation == "unigist"
assert unigist.generate(model, tokenizer, "the cat sat on the mat", max_new_tokens=8, progress=False).text == _before
print("RELOAD OK")
"""

CHECK_PEFT = """
assert unigist.hf.is_patched(merged)
_merged = unigist.generate(merged, tokenizer, "the cat sat on the mat", max_new_tokens=8, progress=False).text
_loaded = AutoModelForCausalLM.from_pretrained("unigist-merged", attn_implementation="unigist")
assert unigist.generate(_loaded, tokenizer, "the cat sat on the mat", max_new_tokens=8, progress=False).text == _merged
print("PEFT OK")
"""


def test_readme_blocks_run(tmp_path):
    pytest.importorskip("peft")
    script = "\n".join([
        readme_block("Quickstart"), CHECK_QUICKSTART,
        readme_block("Saving and reloading"), CHECK_RELOAD,
        readme_block("PEFT / LoRA"), CHECK_PEFT,
    ])
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    for marker in ("QUICKSTART OK", "RELOAD OK", "PEFT OK"):
        assert marker in out
    assert "'cache_length'" in out  # the quickstart printed its KV statistics
    assert (tmp_path / "unigist-model" / "config.json").exists() and (tmp_path / "unigist-adapter").is_dir()


def test_readme_lists_the_supported_models():
    from unigist.hf import SUPPORTED_MODEL_TYPES

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("\n## Supported models\n"):]
    section = section[: section.index("\n## ", 1)]
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "olmo2": "OLMo2",
             "gemma3_text": "Gemma3 text"}
    assert set(names) == set(SUPPORTED_MODEL_TYPES)
    for name in names.values():
        assert name in section, name
