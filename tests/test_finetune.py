"""BERT pretraining (recipe, metrics, overfitting a tiny corpus) and `lmforge finetune` end to end on
tiny models saved in the test: classification (+ LoRA), NER, QA, causal-LM prefix tuning."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge import BertConfig, BertForMaskedLM, BertForPreTraining, GPTConfig, GPTForCausalLM, Tokenizer
from lmforge.data import MLMCollator
from lmforge.training import Trainer, TrainingArguments
from lmforge.training.finetune import finetune, predict_answers, prefix_example
from lmforge.training.pretrain import bert_documents, masked_unigram_loss, pretrain, split_sentences

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "the bird sang a song.",
    "my friend reads a book.",
    "the sun is warm today.",
    "we walk to the river.",
    "the king rode a horse.",
    "she wrote a long letter.",
]
GOOD = [
    "what a great and happy day",
    "i love this wonderful film",
    "a great joy and a happy song",
    "wonderful, lovely, great work",
    "happy people love the sun",
]
BAD = [
    "what a terrible and sad day",
    "i hate this awful film",
    "a sad loss and an awful song",
    "terrible, ugly, awful work",
    "sad people hate the rain",
]


def quiet_args(out: Path, **kw: Any) -> TrainingArguments:
    opts = dict(
        output_dir=str(out),
        device="cpu",
        disable_tqdm=True,
        peak_flops=1e12,
        report_to="jsonl",
        save_strategy="no",
        seed=0,
    )
    return TrainingArguments(**{**opts, **kw})


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    return Tokenizer.train_wordpiece(iterator=SENTENCES + GOOD + BAD, vocab_size=120, min_frequency=1)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, wordpiece: Tokenizer) -> Path:
    """A tiny randomly initialised BERT with its tokenizer, saved in Hugging Face's layout."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=len(wordpiece),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=wordpiece.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(out, tokenizer=wordpiece)
    return out


# ------------------------------------------------------------------------------ BERT pretraining
def test_tiny_bert_overfits_a_tiny_corpus(tmp_path: Path, wordpiece: Tokenizer) -> None:
    """Masked-LM loss on 8 sentences falls by at least 80% (the model memorises the corpus)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(wordpiece),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=wordpiece.pad_token_id,
    )
    model = BertForMaskedLM(config)
    data = [{"input_ids": wordpiece(s)["input_ids"]} for s in SENTENCES] * 4
    args = quiet_args(
        tmp_path,
        max_steps=300,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        warmup_steps=20,
        lr_scheduler_type="constant",
        logging_steps=10,
    )
    trainer = Trainer(model, args, train_dataset=data, data_collator=MLMCollator(wordpiece, seed=0))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] > math.log(len(wordpiece)) * 0.8  # starts near a uniform guess
    assert losses[-1] <= 0.2 * losses[0], losses


def test_sentences_and_documents_for_next_sentence_pairs(wordpiece: Tokenizer, tmp_path: Path) -> None:
    assert split_sentences("To be. Or not? Yes!\n却说曹操。引兵而去！") == [
        "To be.",
        "Or not?",
        "Yes!",
        "却说曹操。",
        "引兵而去！",
    ]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(SENTENCES[i : i + 4]) for i in range(0, 8, 2)) + "\n", encoding="utf-8")
    docs = bert_documents([str(corpus)], wordpiece, min_tokens=1)
    assert [len(d) for d in docs] == [4, 4, 4, 2]  # one document per block, one entry per sentence
    assert docs[0][0] == wordpiece.encode(SENTENCES[0])
    joined = bert_documents([str(corpus)], wordpiece, min_tokens=10_000)
    assert len(joined) == 1 and len(joined[0]) == 14  # short blocks are joined into one document


def test_bert_pretrain_recipe_reports_masked_perplexity_and_nsp_accuracy(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(" ".join(SENTENCES[(i + j) % 8] for j in range(6)) for i in range(12)) + "\n", encoding="utf-8"
    )
    recipe = {
        "data": [str(corpus)],
        "out": str(tmp_path / "run"),
        "val_fraction": 0.2,
        "tokenizer": {"vocab_size": 100, "min_frequency": 1},
        "model": {
            "type": "bert",
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "mlm": {"max_length": 32, "nsp": True},
        "training": {
            "max_steps": 6,
            "per_device_train_batch_size": 8,
            "learning_rate": 1e-3,
            "eval_steps": 3,
            "save_steps": 3,
            "seed": 0,
            "device": "cpu",
            "disable_tqdm": True,
            "peak_flops": 1e12,
        },
        "sample": {"text": "the cat sat on the [MASK].", "top_k": 3},
    }
    metrics = pretrain(recipe)
    assert metrics["step"] == 6
    assert 1.0 < metrics["eval_masked_lm_perplexity"] < 2 * 100  # vocabulary-sized at the start, not more
    assert metrics["eval_masked_lm_perplexity"] == pytest.approx(math.exp(metrics["eval_masked_lm_loss"]))
    assert "eval_nsp_accuracy" in metrics  # reported (its value after 6 steps is chance, so not checked)
    assert "eval_perplexity" not in metrics  # MLM + NSP loss is not a perplexity
    assert 0.0 < metrics["unigram_baseline_masked_loss"] < math.log(100) + 1  # context-free guess, near ln V or below
    model = BertForPreTraining.from_pretrained(tmp_path / "run")
    assert model.config.max_position_embeddings == 32
    from transformers import BertForPreTraining as HFBertForPreTraining  # the checkpoint is HF-loadable

    hf = HFBertForPreTraining.from_pretrained(tmp_path / "run")
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).prediction_logits, model.eval()(ids).prediction_logits, atol=1e-5)


def test_masked_unigram_baseline_by_hand() -> None:
    train = [{"input_ids": [5, 5, 6]}, {"input_ids": [5]}]  # counts +1 smoothing over V=8: 5 -> 4, 6 -> 2, others 1
    evaluation = [{"labels": [-100, 5, -100]}, {"labels": [6, -100]}]
    total = 4 + 2 + 6  # smoothed counts sum to 12
    assert masked_unigram_loss(train, evaluation, 8) == pytest.approx(-(math.log(4 / total) + math.log(2 / total)) / 2)


def test_bert_recipes_are_bundled() -> None:
    from lmforge.training.pretrain import load_recipe

    for name, corpus in (("bert-shakespeare", "shakespeare"), ("bert-sanguo", "sanguo")):
        recipe = load_recipe(name)
        assert recipe["model"]["type"] == "bert" and recipe["data"] == [corpus] and recipe["mlm"]["nsp"]
    # the Chinese sentiment recipe's base model: masked LM only, on the training reviews (never the test ones)
    recipe = load_recipe("bert-zh-reviews")
    assert recipe["model"]["type"] == "bert" and recipe["data"] == ["zh-reviews-train"]
    assert recipe["mlm"]["nsp"] is False and recipe["out"] == "runs/bert-zh-reviews"


def test_finetune_on_the_bundled_chinese_reviews(tmp_path: Path) -> None:
    """`train="sentiment-zh"`: the fixed split (all 1,719 test reviews evaluated), Chinese label names,
    and a model that classifies Chinese text afterwards."""
    from lmforge import AutoModelForSequenceClassification, pipeline
    from lmforge.data import load_zh_sentiment

    reviews = [e["text"] for e in load_zh_sentiment("train", max_examples=300)[0]]
    tok = Tokenizer.train_wordpiece(iterator=reviews, vocab_size=800, min_frequency=2)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "base", tokenizer=tok)
    report = finetune(
        "classification",
        tmp_path / "base",
        "sentiment-zh",
        out=tmp_path / "zh",
        max_train_examples=64,
        training={
            "max_steps": 4,
            "per_device_train_batch_size": 16,
            "per_device_eval_batch_size": 256,
            "disable_tqdm": True,
            "peak_flops": 1e12,
            "device": "cpu",
        },
    )
    assert (report["train_examples"], report["eval_examples"]) == (64, 1719)
    assert report["labels"] == {0: "negative", 1: "positive"} and report["max_length"] == 64
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "zh").eval()
    assert model.config.id2label[1] == "positive"
    # the reported accuracy is the saved model's on the whole test split (recomputed here in other batches: a
    # prediction could flip only at a near tie, so a couple of reviews of slack)
    test, _ = load_zh_sentiment("test")
    saved_tok = Tokenizer.from_pretrained(tmp_path / "zh")
    with torch.no_grad():
        predictions = torch.cat(
            [
                model(
                    **saved_tok(
                        [e["text"] for e in test[i : i + 500]],
                        padding=True,
                        truncation=True,
                        max_length=64,
                        return_tensors="pt",
                    )
                ).logits.argmax(-1)
                for i in range(0, len(test), 500)
            ]
        )
    accuracy = float((predictions == torch.tensor([e["label"] for e in test])).float().mean())
    assert report["eval_accuracy"] == pytest.approx(accuracy, abs=2.5 / 1719)
    # the pipeline's label and score are the model's argmax and softmax
    review = "质量很好，物流也快。"
    (out,) = pipeline("sentiment-analysis", model=str(tmp_path / "zh"))([review])
    with torch.no_grad():
        probabilities = model(**saved_tok(review, return_tensors="pt")).logits[0].softmax(-1)
    assert out["label"] == model.config.id2label[int(probabilities.argmax())]
    assert out["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_the_chinese_sentiment_recipe_runs_from_the_command_line(tmp_path: Path) -> None:
    """The recipe's two commands, shrunk (1 layer, 2 steps each): `lmforge pretrain bert-zh-reviews`
    trains a character WordPiece and an MLM-only BERT on the training reviews; `lmforge finetune
    classification --train sentiment-zh` fine-tunes it and evaluates all 1,719 held-out reviews."""
    import os

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}  # where zh-reviews-train is written
    tiny = [
        "model.num_hidden_layers=1",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_attention_heads=2",
        "training.per_device_train_batch_size=4",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.eval_max_batches=1",
        "training.disable_tqdm=true",
    ]
    pre = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "pretrain",
            "bert-zh-reviews",
            "--out",
            str(tmp_path / "base"),
            "--max-steps",
            "2",
            "--no-sample",
            *[a for kv in tiny for a in ("--set", kv)],
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert pre.returncode == 0, pre.stderr
    assert "masked LM, length 128" in pre.stdout and "unigram baseline" in pre.stdout
    (corpus,) = (tmp_path / "cache" / "lmforge" / "corpora").glob("zh-reviews-train-*.txt")
    tok = Tokenizer.from_pretrained(tmp_path / "base")
    assert 5000 < len(tok) <= 6000 and tok.tokenize("质量很好") == ["质", "量", "很", "好"]  # one character per token
    ft = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmforge",
            "finetune",
            "classification",
            "--model",
            str(tmp_path / "base"),
            "--train",
            "sentiment-zh",
            "--out",
            str(tmp_path / "cli"),
            "--max-train-examples",
            "32",
            "--max-steps",
            "2",
            "--set",
            "disable_tqdm=true",
            "--set",
            "peak_flops=1e12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert ft.returncode == 0, ft.stderr
    saved = json.loads((tmp_path / "cli" / "eval_results.json").read_text(encoding="utf-8"))
    assert (saved["train_examples"], saved["eval_examples"], saved["steps"]) == (32, 1719, 2)
    assert saved["labels"] == {"0": "negative", "1": "positive"}
    correct = saved["eval_accuracy"] * 1719  # a share of the 1,719 reviews, not a mean over batches
    assert correct == pytest.approx(round(correct), abs=0.01)  # (computed in float32: ~1e-4 off a whole count)


# ------------------------------------------------------------------------------ fine-tuning
def test_finetune_classification_learns_and_writes_a_loadable_model(bert_dir: Path, tmp_path: Path) -> None:
    rows = ["text\tlabel"] + [f"{t}\tpos" for t in GOOD] * 4 + [f"{t}\tneg" for t in BAD] * 4
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    evals = ["text\tlabel"] + [f"{t}\tpos" for t in GOOD] + [f"{t}\tneg" for t in BAD]
    (tmp_path / "eval.tsv").write_text("\n".join(evals) + "\n", encoding="utf-8")
    report = finetune(
        "classification",
        bert_dir,
        tmp_path / "train.tsv",
        eval=tmp_path / "eval.tsv",
        out=tmp_path / "cls",
        training={
            "num_train_epochs": 15,
            "learning_rate": 3e-3,
            "per_device_train_batch_size": 8,
            "disable_tqdm": True,
            "peak_flops": 1e12,
            "device": "cpu",
        },
    )
    assert report["eval_accuracy"] == 1.0 and report["labels"] == {0: "neg", 1: "pos"}
    saved = json.loads((tmp_path / "cls" / "eval_results.json").read_text(encoding="utf-8"))
    assert saved["eval_accuracy"] == 1.0 and saved["train_examples"] == 40
    from lmforge import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    tok = Tokenizer.from_pretrained(tmp_path / "cls")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        logits = model(**tok([GOOD[0], BAD[0]], padding=True, return_tensors="pt")).logits
    assert logits.argmax(-1).tolist() == [1, 0]
    assert (tmp_path / "cls" / "training_curves.png").is_file()
    # the trained model through the pipeline: transformers' output schema, the learnt labels, softmax scores
    from lmforge import pipeline

    classify = pipeline("sentiment-analysis", model=str(tmp_path / "cls"))
    outs = classify([GOOD[1], BAD[1]])
    assert [o["label"] for o in outs] == ["pos", "neg"] and all(set(o) == {"label", "score"} for o in outs)
    assert all(o["score"] > 0.9 for o in outs)
    ranked = classify(GOOD[1], top_k=None)
    assert [r["label"] for r in ranked] == ["pos", "neg"]
    assert sum(r["score"] for r in ranked) == pytest.approx(1.0, abs=1e-6)


def test_finetune_with_lora_trains_adapters_and_writes_a_merged_model(bert_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": t, "label": 1} for t in GOOD] * 4 + [{"text": t, "label": 0} for t in BAD] * 4
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    report = finetune(
        "classification",
        bert_dir,
        tmp_path / "train.jsonl",
        out=tmp_path / "lora",
        lora=True,
        lora_r=4,
        eval_fraction=0.25,
        training={"num_train_epochs": 2, "disable_tqdm": True, "peak_flops": 1e12, "device": "cpu"},
    )
    assert report["eval_examples"] == 10 and "eval_accuracy" in report
    out = tmp_path / "lora"
    adapters = (out / "adapter_model.safetensors").stat().st_size
    assert adapters < (out / "model.safetensors").stat().st_size / 3
    from lmforge import BertForSequenceClassification, load_adapters

    base = BertForSequenceClassification.from_pretrained(out).eval()  # base weights + adapters = the trained model
    load_adapters(base, out)
    merged = BertForSequenceClassification.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[2, 9, 10, 11, 3]])
    with torch.no_grad():
        assert torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-5)


def test_finetune_ner_from_conll(bert_dir: Path, tmp_path: Path) -> None:
    sentence = [("the", "O"), ("king", "B-PER"), ("rode", "O"), ("to", "O"), ("the", "O"), ("river", "B-LOC")]
    text = "\n\n".join("\n".join(f"{w} {t}" for w, t in sentence) for _ in range(12)) + "\n"
    (tmp_path / "train.conll").write_text(text, encoding="utf-8")
    report = finetune(
        "ner",
        bert_dir,
        tmp_path / "train.conll",
        out=tmp_path / "ner",
        eval_fraction=0.25,
        training={
            "num_train_epochs": 40,
            "learning_rate": 5e-3,
            "disable_tqdm": True,
            "peak_flops": 1e12,
            "device": "cpu",
        },
    )
    assert set(report["labels"].values()) == {"O", "B-LOC", "B-PER"} and report["labels"][0] == "O"
    assert report["eval_f1"] == 1.0  # the same sentence: learnt exactly
    # the trained tagger through the ner pipeline: whole words with character offsets into the input
    from lmforge import pipeline

    text = "the king rode to the river"
    ner = pipeline("ner", model=str(tmp_path / "ner"))
    # "first" reads each word's tag where training put it (the first piece): whole words, exact offsets
    entities = ner(text, aggregation_strategy="first")
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in entities] == [
        ("PER", "king", 4, 8),
        ("LOC", "river", 21, 26),
    ]
    assert all(e["score"] > 0.5 for e in entities)
    words = {(m.start(), m.end()) for m in re.finditer(r"\S+", text)}
    for entity in ner(text, aggregation_strategy="max"):  # whole words too (tags of untrained pieces vary)
        assert (entity["start"], entity["end"]) in words and text[entity["start"] : entity["end"]] == entity["word"]
    # token-level: the trained first pieces of "king" and "river", offsets inside the words (as transformers)
    tokens = {t["start"]: t for t in ner(text)}
    assert tokens[4]["entity"] == "B-PER" and "king".startswith(tokens[4]["word"])
    assert tokens[21]["entity"] == "B-LOC" and "river".startswith(tokens[21]["word"])
    assert all(text[t["start"] : t["end"]] == t["word"].removeprefix("##") for t in tokens.values())


def test_finetune_is_reproducible_whatever_the_global_random_state(bert_dir: Path, tmp_path: Path) -> None:
    """The task head is drawn while loading, before training starts: `seed` must cover it, so the same
    call gives the same model even when other code consumed random numbers before."""
    from safetensors.torch import load_file

    rows = ["text\tlabel"] + [f"{t}\tpos" for t in GOOD] + [f"{t}\tneg" for t in BAD]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    weights = []
    for k in (1, 2):
        torch.manual_seed(100 + k)
        torch.randn(7 * k)  # some other code used the global generator
        finetune(
            "classification",
            bert_dir,
            tmp_path / "train.tsv",
            out=tmp_path / f"run{k}",
            eval_fraction=0.2,
            training={"max_steps": 2, "disable_tqdm": True, "peak_flops": 1e12, "device": "cpu"},
        )
        weights.append(load_file(tmp_path / f"run{k}" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_finetune_qa_on_squad_json(bert_dir: Path, tmp_path: Path) -> None:
    context = "the king rode a horse to the river. the cat sat on the mat."
    qas = [
        {
            "id": f"q{i}",
            "question": "who sat on the mat?",
            "answers": [{"text": "the cat", "answer_start": context.index("the cat")}],
        }
        for i in range(16)
    ]
    squad = {"data": [{"paragraphs": [{"context": context, "qas": qas}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad), encoding="utf-8")
    report = finetune(
        "qa",
        bert_dir,
        tmp_path / "squad.json",
        out=tmp_path / "qa",
        eval_fraction=0.25,
        training={
            "num_train_epochs": 30,
            "learning_rate": 5e-3,
            "disable_tqdm": True,
            "peak_flops": 1e12,
            "device": "cpu",
        },
    )
    assert report["eval_exact_match"] == 100.0 and report["eval_f1"] == 100.0
    # the trained reader through the question-answering pipeline: the span and its character offsets
    from lmforge import pipeline

    answer = pipeline("question-answering", model=str(tmp_path / "qa"))(question="who sat on the mat?", context=context)
    assert set(answer) == {"answer", "score", "start", "end"}
    assert (answer["answer"], answer["start"], answer["end"]) == ("the cat", 36, 43) and 0 < answer["score"] <= 1


def test_best_span_across_chunks_finds_an_answer_in_the_last_chunk(wordpiece: Tokenizer) -> None:
    from lmforge.data import prepare_qa_features

    context = " ".join(["the sun is warm today."] * 12 + ["the king rode a horse."])
    example = {
        "id": "x",
        "question": "who rode?",
        "context": context,
        "answers": {"text": ["the king"], "answer_start": [context.index("the king")]},
        "is_impossible": False,
    }
    features = prepare_qa_features([example], wordpiece, max_length=24, doc_stride=8)
    assert len(features) > 3
    last = features[-1]
    starts, ends = [], []
    for f in features:  # logits that point at "the king" wherever a chunk holds it, low elsewhere
        s = torch.full((len(f["input_ids"]),), -5.0)
        e = s.clone()
        if f is last:
            s[last["start_positions"]], e[last["end_positions"]] = 5.0, 5.0
        starts.append(s.numpy())
        ends.append(e.numpy())
    assert last["start_positions"] > 0
    assert predict_answers([example], features, starts, ends) == {"x": "the king"}


def test_causal_lm_prefix_examples_score_only_the_target(tmp_path: Path) -> None:
    tok = Tokenizer.train_bpe(iterator=SENTENCES, vocab_size=300)
    ex = prefix_example(tok, "modernise: thou art\n", "you are", max_length=64)
    prompt = tok.encode("modernise: thou art\n")
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [-100] * len(prompt)
    assert ex["labels"][len(prompt) :] == tok.encode("you are") + [tok.eos_token_id]
    short = prefix_example(tok, "modernise: " + "thou art " * 20, "you are", max_length=12)
    assert len(short["input_ids"]) == 12 and short["labels"][-1] == tok.eos_token_id  # the prompt lost its start

    torch.manual_seed(0)
    model = GPTForCausalLM(
        GPTConfig(vocab_size=len(tok), n_positions=64, n_layer=1, n_head=2, n_embd=32, eos_token_id=tok.eos_token_id)
    )
    model.save_pretrained(tmp_path / "gpt", tokenizer=tok)
    pairs = [{"input": s, "output": s.upper()} for s in SENTENCES] * 2
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n", encoding="utf-8")
    report = finetune(
        "causal-lm",
        tmp_path / "gpt",
        tmp_path / "pairs.jsonl",
        out=tmp_path / "prefix",
        prefix="upper: ",
        eval_fraction=0.25,
        training={"num_train_epochs": 2, "disable_tqdm": True, "peak_flops": 1e12, "device": "cpu"},
    )
    assert report["prefix"] == "upper: " and math.isfinite(report["eval_perplexity"])


def test_finetune_cli_runs_and_reports_errors_in_one_line(bert_dir: Path, tmp_path: Path) -> None:
    rows = ["pos\t" + t for t in GOOD] + ["neg\t" + t for t in BAD]
    (tmp_path / "train.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "finetune",
        "classification",
        "--model",
        str(bert_dir),
        "--train",
        str(tmp_path / "train.txt"),
        "--out",
        str(tmp_path / "cli"),
        "--epochs",
        "1",
        "--eval-fraction",
        "0.2",
        "--set",
        "disable_tqdm=true",
        "--set",
        "peak_flops=1.0e12",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["task"] == "classification" and report["eval_examples"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "lmforge", "finetune", "sentiment-ish", "--model", str(bert_dir), "--train", "x.tsv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown task 'sentiment-ish'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
