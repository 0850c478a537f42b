"""zero-shot-classification: score labels chosen at call time, with no training on them.

    classify("the match went to extra time", candidate_labels=["sports", "politics"])
        -> {"sequence": ..., "labels": ["sports", "politics"], "scores": [0.93, 0.07]}   (best first)
    a list of sequences -> a list of those

Each label becomes a hypothesis, `hypothesis_template.format(label)` ("This example is {}."), and the
model scores it against the sequence. How depends on the model (chosen once, at construction):

- "nli": a sequence classifier whose `config.id2label` has an entailment label (an NLI model). Each
  (sequence, hypothesis) pair is classified, as transformers does: single-label, a softmax of the
  entailment logits across the labels; multi-label (or one label), per label a softmax over
  (contradiction, entailment).
- "lm": a causal LM (GPTForCausalLM). The LM reads "{sequence}{separator}{hypothesis}" and a label
  scores the mean (`lm_score="mean"`, default) or sum (`"sum"`) log-probability of the hypothesis
  tokens; a softmax across the labels turns those into scores. The mean does not favour short labels.
- "embedding": any other encoder (BertModel, a BERT head's trunk, GPTModel): the cosine similarity of
  the sequence's and each hypothesis's sentence embedding (mean or [CLS] pooling), softmax(cos / T)
  across the labels with `temperature` T (0.05 by default: the scale 20 that sentence-transformers'
  contrastive training uses).

Few-shot prompting for generators: `few_shot_prompt(examples, query)` writes labelled examples before
the query; `FewShotClassifier` scores each label as the LM's continuation of that prompt ("lm" scoring).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.auto import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from lmforge.models import registry
from lmforge.models.bert import BertForSequenceClassification
from lmforge.models.gpt import GPTForSequenceClassification
from lmforge.pipelines.base import Feature, Pipeline, index_list, warn
from lmforge.pipelines.feature_extraction import POOLINGS, sentence_transformers_options, trunk

MODES = ("nli", "lm", "embedding")
LM_SCORES = ("mean", "sum")
DEFAULT_TEMPLATE = "This example is {}."
CLASSIFIERS = (BertForSequenceClassification, GPTForSequenceClassification)  # NLI models are sequence classifiers


def entailment_ids(id2label: dict[int, str]) -> tuple[int, int] | None:
    """(entailment id, contradiction id) of an NLI label map, or None when it has no entailment label.

    Entailment is the first label starting with "entail" (transformers' rule). Contradiction is the label
    starting with "contradict"; without one, transformers' fallback: the last id if entailment is 0,
    else 0 (so {entailment, not_entailment} works)."""
    entail = next((i for i, name in sorted(id2label.items()) if str(name).lower().startswith("entail")), None)
    if entail is None:
        return None
    contra = next((i for i, name in sorted(id2label.items()) if str(name).lower().startswith("contradict")), None)
    if contra is None:
        contra = max(id2label) if entail == 0 else 0
    return entail, contra


def model_mode(model: Any) -> str:
    """How the pipeline scores labels with `model`: "nli", "lm" or "embedding" (see the module doc)."""
    if isinstance(model, CLASSIFIERS):
        labels = model.config.id2label or {}
        if entailment_ids(labels) is None:
            raise TypeError(
                f"the zero-shot-classification pipeline needs an NLI classifier, whose config.id2label "
                f"names an 'entailment' label; this {type(model).__name__} has {sorted(labels.values())}. "
                "Use an NLI checkpoint, a causal LM, or a plain encoder (BertModel) for embedding "
                "similarity"
            )
        return "nli"
    if hasattr(model, "allocate_cache") and hasattr(model, "lm_head"):
        return "lm"
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return "embedding"
    raise TypeError(
        f"the zero-shot-classification pipeline needs an NLI sequence classifier, a causal LM "
        f"(GPTForCausalLM) or an encoder (BertModel), got {type(model).__name__}"
    )


def checkpoint_choice(directory: Path) -> tuple[type[Any], dict[str, Any]]:
    """The Auto class for a checkpoint folder and default options (for `pipeline(..., model=path)`): a
    checkpoint saved as a sequence classifier is an NLI model, one whose family has a causal LM is a causal
    LM, anything else an encoder (with pooling and max_length from a sentence-transformers folder, if it is
    one). The classes are looked up in the model registry by config.json's `architectures` and `model_type`."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    saved_as = [registry.architecture_class(str(a)) for a in config.get("architectures") or []]
    if any(cls is not None and issubclass(cls, CLASSIFIERS) for cls in saved_as):
        return AutoModelForSequenceClassification, {}
    try:
        registry.model_class(AutoModelForCausalLM.task, str(config.get("model_type")), "zero-shot-classification")
        return AutoModelForCausalLM, {}
    except ValueError:  # the registry has no causal LM for this model_type
        defaults = sentence_transformers_options(directory)
        return AutoModel, {k: v for k, v in defaults.items() if k in ("pooling", "max_length")}


def parse_labels(candidate_labels: Any) -> list[str]:
    """Candidate labels as a list: a list/tuple of str, or one str of comma-separated labels (as in
    transformers). Empty, blank or repeated labels are a ValueError."""
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if not isinstance(candidate_labels, (list, tuple)):
        raise TypeError(
            f"candidate_labels must be a list of str (or one comma-separated str), got "
            f"{type(candidate_labels).__name__}"
        )
    labels = list(candidate_labels)
    if not labels:
        raise ValueError(
            "candidate_labels is empty; give at least one label, e.g. candidate_labels=['sports', 'politics']"
        )
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate_labels must be non-empty strings, got {label!r}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"candidate_labels repeats {repeated}; give each label once")
    return labels


def check_template(template: Any) -> str:
    """`template` if it has one `{}` for the label; else a ValueError that says so."""
    if not isinstance(template, str):
        raise TypeError(
            f"hypothesis_template must be a str with {{}} where the label goes, got {type(template).__name__}"
        )
    try:
        filled = template.format("LABEL")
    except (IndexError, KeyError, ValueError) as err:
        raise ValueError(
            f"hypothesis_template {template!r} cannot be filled with a label ({err!r}); use one "
            "plain {} where the label goes, e.g. 'This example is {}.'"
        ) from None
    if filled == template:
        raise ValueError(
            f"hypothesis_template {template!r} has no {{}} for the label; use e.g. 'This example is {{}}.'"
        )
    return template


class ZeroShotClassificationPipeline(Pipeline):
    """Classify sequences into labels given at call time, with an NLI model, a causal LM or an encoder
    (`self.mode`: "nli", "lm" or "embedding"; see the module doc).

    Call: `classify(sequences, candidate_labels, ...)` (labels positional or by keyword). Options:
    `candidate_labels`, `hypothesis_template` ("This example is {}."), `multi_label` (False; NLI only:
    each label scored on its own), `lm_score` ("mean" | "sum" log-prob of the hypothesis tokens; LM),
    `separator` (" ": between sequence and hypothesis; LM), `temperature` (0.05; embedding),
    `pooling` ("mean" | "cls"; embedding), `truncation` (True: cut the sequence, never the hypothesis,
    with a warning), `max_length` (default: the model's length).
    """

    task = "zero-shot-classification"

    def __init__(
        self, model: Any, tokenizer: Any = None, device: Any = None, batch_size: int = 8, **options: Any
    ) -> None:
        self.mode = model_mode(model)
        super().__init__(trunk(model) if self.mode == "embedding" else model, tokenizer, device, batch_size, **options)

    def _check_model(self, model: Any) -> None:
        model_mode(model)

    def _options(
        self,
        candidate_labels: Any = None,
        hypothesis_template: str = DEFAULT_TEMPLATE,
        multi_label: bool = False,
        lm_score: str = "mean",
        separator: str = " ",
        temperature: float = 0.05,
        pooling: str = "mean",
        truncation: bool = True,
        max_length: int | None = None,
    ) -> dict[str, Any]:
        labels = None if candidate_labels is None else parse_labels(candidate_labels)
        if multi_label and self.mode != "nli":
            raise ValueError(
                f"multi_label=True needs an NLI model (it scores entailment against contradiction for "
                f"each label); this pipeline scores labels by {self.mode} and can only rank them "
                "against each other: use multi_label=False"
            )
        if lm_score not in LM_SCORES:
            raise ValueError(
                f"lm_score must be 'mean' or 'sum' (log-probability of the hypothesis tokens), got {lm_score!r}"
            )
        if not isinstance(separator, str):
            raise TypeError(f"separator must be a str, got {type(separator).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        return {
            "labels": labels,
            "template": check_template(hypothesis_template),
            "multi_label": bool(multi_label),
            "lm_score": lm_score,
            "separator": separator,
            "temperature": float(temperature),
            "pooling": pooling,
            "truncation": bool(truncation),
            "max_length": self._limit(max_length),
        }

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Classify one sequence (a dict comes back) or a list/iterable of them; `candidate_labels` may be
        the second positional argument, as in transformers."""
        if len(args) > 1 or (args and "candidate_labels" in kwargs):
            raise TypeError(
                "zero-shot-classification takes (sequences, candidate_labels); pass the other options by keyword"
            )
        if args:
            kwargs["candidate_labels"] = args[0]
        return super().__call__(inputs, **kwargs)

    # ------------------------------------------------------------------ preprocess
    def preprocess(self, items: list[Any], start: int, opts: dict[str, Any]) -> list[Feature]:
        labels = opts["labels"]
        if labels is None:
            raise ValueError(
                "zero-shot-classification needs candidate_labels=[...] (the labels to choose from), "
                "e.g. classify(text, candidate_labels=['sports', 'politics'])"
            )
        hypotheses = [opts["template"].format(label) for label in labels]
        texts = [self._check_text(item, start + k) for k, item in enumerate(items)]
        indices = list(range(start, start + len(items)))
        if self.mode == "lm":
            rows = self._lm_rows(texts, [opts["separator"] + h for h in hypotheses], indices, opts)
        elif self.mode == "nli":
            pairs = [(text, h) for text in texts for h in hypotheses]  # L rows per sequence
            owners = [i for i in indices for _ in hypotheses]
            rows = [self._row(enc) for enc in self._encode_rows(pairs, owners, opts, "only_first")]
        else:  # embedding: the sequence, then its L hypotheses
            inputs = [t for text in texts for t in [text, *hypotheses]]
            owners = [i for i in indices for _ in range(len(hypotheses) + 1)]
            rows = [self._row(enc) for enc in self._encode_rows(inputs, owners, opts, "longest_first")]
        per = len(rows) // len(texts)
        return [
            Feature(rows[k * per : (k + 1) * per], {"sequence": text, "labels": labels}) for k, text in enumerate(texts)
        ]

    def _encode_rows(self, inputs: list[Any], owners: list[int], opts: dict[str, Any], strategy: str) -> list[Any]:
        """Encode texts or (sequence, hypothesis) pairs cut to max_length; one warning (or ValueError)
        per call naming the inputs that were cut."""
        limit = opts["max_length"]
        with self.tokenizer.truncating(limit, strategy=strategy) as backend:
            try:
                encodings = backend.encode_batch(inputs, add_special_tokens=True)
            except Exception as err:  # the backend raises a bare Exception (a hypothesis too long to keep)
                raise ValueError(
                    f"{self.task}: the hypotheses do not fit in {limit} tokens ({err}); shorten the "
                    "template or the labels, or raise max_length"
                ) from None
        cut = sorted({owners[k] for k, enc in enumerate(encodings) if enc.overflowing})
        if cut and not opts["truncation"]:
            raise ValueError(
                f"{self.task}: input {index_list(cut)} is longer than {limit} tokens with its hypothesis "
                "(the model's limit); shorten it, or pass truncation=True to cut it to fit"
            )
        if cut:
            warn(
                f"{self.task}: input {index_list(cut)} is longer than {limit} tokens with its hypothesis (the "
                "model's limit) and was truncated; pass truncation=False to get an error instead"
            )
        return encodings

    def _lm_rows(
        self, texts: list[str], continuations: list[str], indices: list[int], opts: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """One row per (text, continuation): the text's tokens then the continuation's, `n_cont` of them
        scored. A text too long for the context keeps its last tokens (with a warning)."""
        limit = opts["max_length"]
        conts = self.tokenizer.encode_batch_fast(continuations)
        longest = max(len(c) for c in conts)
        if min(len(c) for c in conts) == 0:
            raise ValueError(f"{self.task}: a hypothesis gives no tokens; give every label some text")
        if longest >= limit:
            raise ValueError(
                f"{self.task}: a hypothesis has {longest} tokens, leaving no room for the sequence in "
                f"the model's {limit}; shorten the template or the labels"
            )
        rows, cut = [], []
        for index, text, ids in zip(indices, texts, self.tokenizer.encode_batch_fast(texts)):
            if not ids:
                raise ValueError(f"{self.task}: input {index} ({text!r}) gives no tokens; give it some text")
            if len(ids) + longest > limit:
                if not opts["truncation"]:
                    raise ValueError(
                        f"{self.task}: input {index} has {len(ids)} tokens; with its hypothesis that is "
                        f"more than the model's context of {limit}; shorten it, or pass "
                        "truncation=True to keep its last tokens"
                    )
                ids = ids[len(ids) - (limit - longest) :]
                cut.append(index)
            rows += [{"input_ids": ids + c, "n_cont": len(c)} for c in conts]
        if cut:
            warn(
                f"{self.task}: input {index_list(cut)} is too long for the model's context of {limit} tokens with "
                "its hypothesis and keeps only its last tokens; pass truncation=False to get an error instead"
            )
        return rows

    # ------------------------------------------------------------------ forward
    def _forward(self, rows: list[dict[str, Any]], opts: dict[str, Any]) -> list[torch.Tensor]:
        gpt_classifier = self.mode == "nli" and hasattr(self.model, "transformer")
        # a GPT classifier finds each row's last token by its pad id
        batch = self._collate(rows, pad_id=self.model.config.pad_token_id if gpt_classifier else None)
        if self.mode == "nli":
            return list(self.model(**self._model_inputs(batch)).logits.float().cpu())  # (B, num_labels)
        if self.mode == "lm":
            logits = self.model(**self._model_inputs(batch)).logits.float()  # (B, T, V)
            logp = logits[:, :-1].log_softmax(-1)  # (B, T-1, V): position t predicts token t+1
            targets = batch["input_ids"][:, 1:]  # (B, T-1)
            token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            out = []
            for b, row in enumerate(rows):
                n, length = row["n_cont"], len(row["input_ids"])
                out.append(token_logp[b, length - 1 - n : length - 1].cpu())  # (n,) the continuation's tokens
            return out
        hidden = self.model(**self._model_inputs(batch)).last_hidden_state.float()  # (B, T, C)
        if opts["pooling"] == "cls":
            vectors = hidden[:, 0]  # (B, C)
        else:
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, C)
        return list(F.normalize(vectors, p=2, dim=-1).cpu())

    def _batches(self, rows: list[dict[str, Any]], batch_size: int, opts: dict[str, Any]) -> list[list[int]]:
        if (
            self.mode == "nli"
            and hasattr(self.model, "transformer")
            and getattr(self.model.config, "pad_token_id", None) is None
        ):
            return [[i] for i in range(len(rows))]  # a GPT classifier without a pad id: rows run alone
        return super()._batches(rows, batch_size, opts)

    # ------------------------------------------------------------------ postprocess
    def label_scores(self, outputs: list[torch.Tensor], opts: dict[str, Any]) -> torch.Tensor:
        """Scores (L,) of the labels from one sequence's row outputs (see the module doc)."""
        if self.mode == "nli":
            logits = torch.stack(outputs)  # (L, num_labels)
            entail, contra = entailment_ids(self.model.config.id2label)  # type: ignore[misc]
            if opts["multi_label"] or len(outputs) == 1:
                return logits[:, [contra, entail]].softmax(-1)[:, 1]  # (L,): entailment vs contradiction
            return logits[:, entail].softmax(-1)  # (L,): entailment across the labels
        if self.mode == "lm":
            reduce = torch.mean if opts["lm_score"] == "mean" else torch.sum
            return torch.stack([reduce(lp) for lp in outputs]).softmax(-1)  # (L,)
        sequence, hypotheses = outputs[0], torch.stack(outputs[1:])  # (C,), (L, C): unit vectors
        return (hypotheses @ sequence / opts["temperature"]).softmax(-1)  # (L,)

    def postprocess(self, feature: Feature, outputs: list[Any], opts: dict[str, Any]) -> dict[str, Any]:
        scores = self.label_scores(outputs, opts).tolist()
        labels = feature.meta["labels"]
        order = sorted(range(len(labels)), key=lambda i: -scores[i])
        return {
            "sequence": feature.meta["sequence"],
            "labels": [labels[i] for i in order],
            "scores": [scores[i] for i in order],
        }


# ---------------------------------------------------------------------------- few-shot prompting
def _split_template(template: str) -> tuple[str, str]:
    """A few-shot template "A{text}B{label}" as (A, B); a ValueError if it is not of that form."""
    if not isinstance(template, str) or "{text}" not in template or not template.endswith("{label}"):
        raise ValueError(
            f"a few-shot template needs {{text}} and must end with {{label}}, e.g. "
            f"'Text: {{text}}\\nLabel: {{label}}'; got {template!r}"
        )
    before, after = template.split("{text}", 1)
    return before, after[: -len("{label}")]


def few_shot_prompt(
    examples: Sequence[tuple[str, str]],
    query: str,
    template: str = "Text: {text}\nLabel: {label}",
    separator: str = "\n\n",
) -> str:
    """Labelled examples, then the query with its label left open, for a generator to continue.

    Each example is `template.format(text=..., label=...)`; examples are joined by `separator`; the query
    is the template up to `{label}` with trailing spaces removed (the label's leading space belongs to the
    label's tokens), e.g. "Text: great film\\nLabel: positive\\n\\nText: dull\\nLabel:".
    """
    before, between = _split_template(template)
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    shots = []
    for k, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 2:
            raise ValueError(f"few-shot example {k} must be a (text, label) pair, got {example!r}")
        text, label = example
        shots.append(f"{before}{text}{between}{label}")
    return separator.join(shots + [before + query + between.rstrip(" ")])


class FewShotClassifier:
    """Few-shot classification with a causal LM: each label is scored as the continuation of
    `few_shot_prompt(examples, text)` (mean or sum log-probability of its tokens, softmax across labels),
    by a "lm"-mode ZeroShotClassificationPipeline.

        clf = FewShotClassifier(pipeline("zero-shot-classification", model="gpt2"),
                                [("great film", "positive"), ("dull", "negative")])
        clf("a joy to watch")  # {"sequence": "a joy to watch", "labels": [...], "scores": [...]}
    """

    def __init__(
        self,
        classifier: Any,
        examples: Sequence[tuple[str, str]],
        labels: Sequence[str] | None = None,
        template: str = "Text: {text}\nLabel: {label}",
        separator: str = "\n\n",
        tokenizer: Any = None,
        lm_score: str = "mean",
    ) -> None:
        if not isinstance(classifier, ZeroShotClassificationPipeline):
            classifier = ZeroShotClassificationPipeline(classifier, tokenizer)
        if classifier.mode != "lm":
            raise TypeError(
                f"FewShotClassifier needs a causal LM (GPTForCausalLM); this model scores labels by {classifier.mode}"
            )
        _split_template(template)
        self.classifier, self.examples = classifier, [tuple(e) for e in examples]
        self.labels = parse_labels(
            list(labels) if labels is not None else list(dict.fromkeys(str(label) for _, label in self.examples))
        )
        self.template, self.separator, self.lm_score = template, separator, lm_score
        few_shot_prompt(self.examples, "", template, separator)  # checks the examples now

    def prompt(self, text: str) -> str:
        """The prompt whose continuation is scored for `text`."""
        return few_shot_prompt(self.examples, text, self.template, self.separator)

    def __call__(self, texts: str | Sequence[str]) -> Any:
        """{"sequence", "labels", "scores"} for one text, or a list of those for a list."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        between = _split_template(self.template)[1]
        gap = between[len(between.rstrip(" ")) :]  # the spaces few_shot_prompt took off go before the label
        results = self.classifier(
            [self.prompt(t) for t in batch],
            candidate_labels=self.labels,
            hypothesis_template="{}",
            separator=gap,
            lm_score=self.lm_score,
        )
        for result, text in zip(results, batch):
            result["sequence"] = text
        return results[0] if single else results
