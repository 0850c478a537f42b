"""Tests for the `lmforge` command: help, pretrain -> generate, tokenizer training, resume, and
user errors (exit status 2, one line, no traceback)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import DOCS

from lmforge import __version__
from lmforge.cli import main
from lmforge.config import GPTConfig
from lmforge.data import CorpusError
from lmforge.tokenizer import Tokenizer

# a tiny model and a short run, all through --set
TINY = [
    "--device",
    "cpu",
    "--seed",
    "0",
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_head=2",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_positions=32",
    "--set",
    "tokenizer.vocab_size=300",
    "--set",
    "val_fraction=0.2",
    "--set",
    "training.per_device_train_batch_size=4",
    "--set",
    "training.per_device_eval_batch_size=4",
    "--set",
    "training.warmup_steps=0",
    "--set",
    "training.logging_steps=1",
    "--set",
    "training.eval_steps=2",
    "--set",
    "training.eval_max_batches=2",
    "--set",
    "training.save_steps=2",
    "--set",
    "training.peak_flops=1e12",
    "--set",
    "training.disable_tqdm=true",
    "--set",
    "sample.max_new_tokens=3",
]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help, --version, usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `lmforge pretrain` run of 4 steps; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    code, stdout, stderr = run_main(
        ["pretrain", "--data", str(corpus_file), "--out", str(out), "--max-steps", "4", *TINY]
    )
    assert code == 0, stderr
    return {"out": out, "stdout": stdout}


# ---------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ["pretrain", "generate", "tokenizer"]),
        (["pretrain"], ["--data", "--out", "--max-steps", "--seed", "--resume", "--set", "--device", "recipe"]),
        (
            ["generate"],
            ["model_dir", "prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop"],
        ),
        (["tokenizer"], ["train"]),
        (["tokenizer", "train"], ["sources", "--vocab-size", "--min-frequency", "--out"]),
    ],
)
def test_help_exits_0_and_lists_options(argv: list[str], expected: list[str]) -> None:
    code, stdout, _ = run_main([*argv, "--help"])
    assert code == 0
    assert stdout.startswith("usage: lmforge")
    for option in expected:
        assert option in stdout


def test_version_and_missing_command() -> None:
    code, stdout, _ = run_main(["--version"])
    assert (code, stdout.strip()) == (0, f"lmforge {__version__}")
    code, _, stderr = run_main([])
    assert code == 2 and "usage:" in stderr


# ---------------------------------------------------------------------------- pretrain -> generate
def test_pretrain_writes_a_model_dir(trained: dict[str, Any]) -> None:
    out = trained["out"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "training_args.json"):
        assert (out / name).is_file(), name
    config = GPTConfig.from_pretrained(out)
    assert (config.n_layer, config.n_head, config.n_embd, config.n_positions) == (1, 2, 32, 32)
    assert config.vocab_size == len(Tokenizer.from_pretrained(out)) == 300
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_steps"] == 4 and args["seed"] == 0 and args["peak_flops"] == 1e12
    summary = json.loads(trained["stdout"].strip().splitlines()[-1])  # the last line is the metrics
    assert summary["step"] == 4 and summary["output_dir"] == str(out)
    assert summary["eval_loss"] > 0 and summary["unigram_baseline_loss"] > 0
    assert "lmforge: sample from" in trained["stdout"]


def test_generate_continues_the_prompt_reproducibly(trained: dict[str, Any]) -> None:
    def generate(*extra: str) -> str:
        code, stdout, stderr = run_main(["generate", str(trained["out"]), "The quick", "--max-new-tokens", "5", *extra])
        assert code == 0, stderr
        return stdout

    first = generate("--seed", "1")
    assert first.startswith("The quick") and first.endswith("\n") and len(first) > len("The quick\n")
    assert generate("--seed", "1") == first
    assert generate("--seed", "2") != first
    greedy = generate("--temperature", "0", "--seed", "1")
    assert generate("--temperature", "0", "--seed", "7") == greedy  # greedy ignores the seed


def test_generate_default_length_stays_inside_the_context(trained: dict[str, Any]) -> None:
    tok = Tokenizer.from_pretrained(trained["out"])
    prompt = "The quick brown fox"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit --max-new-tokens past the context would warn
        code, stdout, stderr = run_main(["generate", str(trained["out"]), prompt, "--temperature", "0"])
    assert code == 0, stderr
    # the model's context is 32 tokens: the default fills what the prompt leaves, and no more
    assert len(tok.encode(stdout.rstrip("\n"))) <= 32
    with pytest.warns(UserWarning, match="past the model's context"):
        run_main(["generate", str(trained["out"]), prompt, "--max-new-tokens", "100"])


def test_resume_continues_to_the_new_max_steps(trained: dict[str, Any], tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    argv = ["pretrain", "--data", str(corpus_file), "--out", str(out), "--max-steps", "6", *TINY]
    code, _, stderr = run_main(argv)
    assert code == 2 and "--resume" in stderr  # no silent restart over an existing run

    code, stdout, stderr = run_main([*argv, "--resume"])
    assert code == 0, stderr
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in stdout
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["samples_seen"] == 6 * 4
    before = (trained["out"] / "metrics.jsonl").read_text().splitlines()
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[: len(before)] == before  # the first run's history is kept, then continued
    steps = [json.loads(ln)["step"] for ln in after[len(before) :]]
    assert steps == sorted(steps) and steps[0] == 5 and steps[-1] == 6


def test_resume_without_flags_reuses_the_runs_own_recipe(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(trained["out"], out)
    data_before = (out / "data" / "train.bin").read_bytes()
    # no --data, no --set: the tiny model and the custom corpus come from out/recipe.json
    code, stdout, stderr = run_main(["pretrain", "--out", str(out), "--resume", "--max-steps", "5"])
    assert code == 0, stderr
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in stdout
    assert (out / "data" / "train.bin").read_bytes() == data_before  # not re-tokenized from Shakespeare
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["global_step"] == 5
    assert GPTConfig.from_pretrained(out).n_embd == 32


def test_tokenizer_train(corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    code, stdout, stderr = run_main(["tokenizer", "train", str(corpus_file), "--vocab-size", "300", "--out", str(out)])
    assert code == 0, stderr
    assert (out / "tokenizer.json").is_file() and "tokenizer.json" in stdout
    tok = Tokenizer.from_pretrained(out)
    assert 258 < len(tok) <= 300
    text = "Shall I compare thee to a winter's night?"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the summer")) < len("the summer")  # merges were learned


# ---------------------------------------------------------------------------- user errors
@pytest.fixture
def bad_inputs(tmp_path: Path, trained: dict[str, Any]) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("Café crème, naïve façade.\n".encode("latin-1"))
    broken = tmp_path / "broken_model"
    shutil.copytree(trained["out"], broken, ignore=shutil.ignore_patterns("checkpoint-*", "data"))
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return {"dir": tmp_path, "broken": broken}


ERROR_CASES = [
    (["pretrain", "--data", "{dir}/missing.txt"], "missing.txt"),
    (["pretrain", "--data", "{dir}/empty.txt"], "empty"),
    (["pretrain", "--data", "{dir}/latin1.txt"], "not valid UTF-8"),
    (["pretrain", "no-such-recipe"], "no-such-recipe"),
    (["pretrain", "--set", "model.n_layer"], "section.key=value"),
    (["pretrain", "--set", "modle.n_layer=2"], "unknown section"),
    (["pretrain", "--set", "training.max_stesp=3"], "max_stesp"),
    (["pretrain", "--set", "training.learning_rate=fast"], "learning_rate"),
    (["pretrain", "--device", "gpu"], "gpu"),
    (["generate", "{dir}/no_model", "Hello"], "does not exist"),
    (["generate", "{broken}", "Hello"], "truncated"),
    (["generate", "{broken}", "Hello", "--device", "gpu"], "gpu"),
    (["tokenizer", "train", "{dir}/missing.txt", "--out", "{dir}/tok"], "missing.txt"),
]


@pytest.mark.parametrize("argv, message", ERROR_CASES, ids=[" ".join(a[:3]) for a, _ in ERROR_CASES])
def test_user_errors_exit_2_with_one_line(argv: list[str], message: str, bad_inputs: dict[str, Path]) -> None:
    argv = [a.format(**bad_inputs) for a in argv]
    if argv[0] == "pretrain":
        argv += ["--out", str(bad_inputs["dir"] / "out")]
    code, _, stderr = run_main(argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"lmforge {argv[0]}: error: ") and message in lines[0]
    assert "Traceback" not in stderr


def test_debug_shows_the_exception(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="missing.txt"):
        main(["pretrain", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out"), "--debug"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["pretrain", "--data", "{dir}/missing.txt", "--out", "{dir}/out"], "missing.txt"),
        (["generate", "{dir}/no_model", "Hello"], "does not exist"),
    ],
)
def test_errors_in_a_real_process(argv: list[str], message: str, tmp_path: Path) -> None:
    argv = [a.format(dir=tmp_path) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_in_a_real_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "pretrain" in proc.stdout and proc.stderr == ""
