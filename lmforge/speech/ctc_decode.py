"""Turning CTC output into words: greedy decoding, and a prefix beam search guided by a word n-gram model.

    log-probabilities (T', V) over [blank, space, a..z]
      greedy:  best symbol per frame -> repeats merged -> blanks dropped -> text
      beam:    CTC prefix beam search (Graves 2012; Hannun et al. 2014): each hypothesis keeps the probability of
               its prefix ending in a blank and in a symbol, so every alignment of a prefix counts once. Words are
               spelled inside a lexicon trie (a letter that leads out of every known word is not tried), and each
               finished word adds  alpha * log P(word | two previous words) + beta; an unfinished word is ranked
               with alpha * (the best unigram log-probability of the words it can still become), the lookahead.

The language model (`NGramLM`) is an interpolated Kneser-Ney trigram model over words, trained on text alone
(`NGramLM.train(sentences)`): the knowledge of spelling and word order that a small acoustic model trained for an
hour cannot learn from a few thousand transcripts. It is saved as JSON counts (no pickle) and rebuilt on load.
Words outside its vocabulary cannot be output by the beam search: that is the price of the lexicon.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.files import atomic_write_bytes

BOS, EOS = "<s>", "</s>"
LM_FILE = "ngram_lm.json.gz"
# the beam search's defaults, chosen on the dev set of `lmforge speech train` (bench/speech_lm_weights.py)
LM_WEIGHT = 0.8  # alpha: the weight of log P(word | context)
WORD_BONUS = 0.5  # beta: added per word


def greedy_decode(log_probs: np.ndarray, alphabet: Sequence[str]) -> str:
    """(T', V) scores of one clip -> text: the best symbol per frame, repeats merged, blanks (index 0) dropped.
    Letters (an alphabet with a space) are joined as written; phonemes are joined with spaces ("h ə l oʊ")."""
    best = np.asarray(log_probs).argmax(axis=-1)
    keep = np.ones(len(best), dtype=bool)
    keep[1:] = best[1:] != best[:-1]
    symbols = [alphabet[i] for i in best[keep] if i != 0]
    return " ".join(("".join(symbols) if " " in alphabet else " ".join(symbols)).split())


class NGramLM:
    """A word trigram model with interpolated Kneser-Ney smoothing (one discount, D = 0.75).

    P(w | u v) = max(c(u v w) - D, 0) / c(u v .) + D * N1+(u v .) / c(u v .) * P2(w | v)
    P2(w | v)  = max(N1+(. v w) - D, 0) / N1+(. v .) + D * N1+(v .) / N1+(. v .) * P1(w)   (continuation counts)
    P1(w)      = N1+(. w) / N1+(. .) mixed with a uniform share over the vocabulary
    An unseen context falls back to the lower order. Sentences are wrapped in <s> ... </s>.

    `pronunciations` (word -> phoneme sequences), when set, is the lexicon of a phoneme recognizer; it is saved with
    the counts.
    """

    def __init__(
        self,
        trigrams: dict[tuple[str, str, str], int],
        discount: float = 0.75,
        pronunciations: dict[str, list[tuple[str, ...]]] | None = None,
    ) -> None:
        self.discount = discount
        self.trigrams = trigrams
        self.pronunciations = pronunciations
        self.vocab = sorted({w for g in trigrams for w in g} - {BOS})
        d = discount
        # third order: counts of (u, v, .) and how many different w follow (u, v)
        ctx3: Counter[tuple[str, str]] = Counter()
        types3: Counter[tuple[str, str]] = Counter()
        # second order, continuation counts: N1+(. v w), and per v: N1+(. v .) and N1+(v .) (distinct w)
        cont2: Counter[tuple[str, str]] = Counter()
        for (u, v, w), n in trigrams.items():
            ctx3[(u, v)] += n
            types3[(u, v)] += 1
            cont2[(v, w)] += 1
        ctx2: Counter[str] = Counter()
        types2: Counter[str] = Counter()
        cont1: Counter[str] = Counter()
        for (v, w), n in cont2.items():
            ctx2[v] += n
            types2[v] += 1
            cont1[w] += 1
        total1 = sum(cont1.values())
        uniform = 1.0 / (len(self.vocab) + 1)
        self._p1 = {w: (1 - 0.01) * n / total1 + 0.01 * uniform for w, n in cont1.items()}
        self._unk = 0.01 * uniform  # a word never seen last in a bigram (only <s> sits there)
        self._ctx3, self._types3, self._cont2, self._ctx2, self._types2 = ctx3, types3, cont2, ctx2, types2
        self._d = d
        self._cache: dict[tuple[str, str, str], float] = {}

    @classmethod
    def train(cls, sentences: Iterable[str], discount: float = 0.75) -> NGramLM:
        """Count the trigrams of `sentences` (already normalised: words separated by spaces)."""
        counts: Counter[tuple[str, str, str]] = Counter()
        for sentence in sentences:
            words = [BOS, BOS, *sentence.split(), EOS]
            if len(words) == 3:
                continue
            counts.update(zip(words, words[1:], words[2:]))
        if not counts:
            raise ValueError("the language model's text has no words")
        return cls(dict(counts), discount)

    def _p2(self, v: str, w: str) -> float:
        p1 = self._p1.get(w, self._unk)
        n_ctx = self._ctx2.get(v)
        if not n_ctx:
            return p1
        return (max(self._cont2.get((v, w), 0) - self._d, 0) + self._d * self._types2[v] * p1) / n_ctx

    def unigram_log_prob(self, w: str) -> float:
        """log P1(w), the continuation unigram (the lowest order of the interpolation)."""
        return math.log(self._p1.get(w, self._unk))

    def log_prob(self, u: str, v: str, w: str) -> float:
        """log P(w | u v) (natural log)."""
        key = (u, v, w)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p2 = self._p2(v, w)
        n_ctx = self._ctx3.get((u, v))
        p = (
            p2
            if not n_ctx
            else (max(self.trigrams.get(key, 0) - self._d, 0) + self._d * self._types3[(u, v)] * p2) / n_ctx
        )
        self._cache[key] = result = math.log(p)
        return result

    def sentence_log_prob(self, sentence: str) -> float:
        """log P(sentence </s>) under the model."""
        words = [BOS, BOS, *sentence.split(), EOS]
        return sum(self.log_prob(*g) for g in zip(words, words[1:], words[2:]))

    def perplexity(self, sentences: Sequence[str]) -> float:
        """Per-word perplexity (</s> counted as a word) of `sentences`."""
        total = sum(self.sentence_log_prob(s) for s in sentences)
        n = sum(len(s.split()) + 1 for s in sentences)
        return math.exp(-total / max(n, 1))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the trigram counts (and pronunciations) as gzip'ed JSON (ngram_lm.json.gz) into `directory`."""
        data: dict[str, Any] = {
            "discount": self.discount,
            "trigrams": [[*g, n] for g, n in sorted(self.trigrams.items())],
        }
        if self.pronunciations is not None:  # phonemes joined by spaces
            data["pronunciations"] = {w: [" ".join(p) for p in ps] for w, ps in sorted(self.pronunciations.items())}
        path = Path(directory) / LM_FILE
        atomic_write_bytes(path, gzip.compress(json.dumps(data, ensure_ascii=False).encode("utf-8"), mtime=0))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NGramLM:
        """Read a model written by `save` (a directory holding ngram_lm.json.gz, or the file)."""
        path = Path(path)
        if path.is_dir():
            path = path / LM_FILE
        try:
            data = json.loads(gzip.decompress(path.read_bytes()))
            trigrams = {(u, v, w): int(n) for u, v, w, n in data["trigrams"]}
            prons = data.get("pronunciations")
            prons = {w: [tuple(p.split()) for p in ps] for w, ps in prons.items()} if prons is not None else None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{str(path)!r} is not an lmforge n-gram model ({e}); train one with NGramLM.train"
            ) from None
        return cls(trigrams, float(data.get("discount", 0.75)), prons)


class _Node:
    """A lexicon trie node: children by symbol id, the words whose pronunciation ends here, and the lookahead (the
    best unigram log-probability of any word below: what an unfinished word may still become)."""

    __slots__ = ("children", "words", "lookahead")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.words: list[str] = []
        self.lookahead = -math.inf


def _build_trie(pronunciations: dict[str, list[tuple[int, ...]]], unigram: Any) -> _Node:
    root = _Node()
    for word, prons in pronunciations.items():
        score = unigram(word)
        for pron in prons:
            node = root
            node.lookahead = max(node.lookahead, score)
            for symbol in pron:
                node = node.children.setdefault(symbol, _Node())
                node.lookahead = max(node.lookahead, score)
            if word not in node.words:
                node.words.append(word)
    return root


@dataclass
class _Beam:
    """A hypothesis: its finished words, where its unfinished word is in the trie, the last symbol it emitted, the
    CTC log-probabilities of its symbols ending in blank / in that symbol, and the LM log-score of its words."""

    words: tuple[str, ...]
    node: _Node
    last: int  # -1 before the first symbol
    blank: float
    symbol: float
    lm: float


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def _merger(beams: dict[tuple[Any, ...], _Beam]) -> Any:
    """add(words, node, last, blank, symbol, lm): put a hypothesis into `beams`, summing the CTC probabilities of the
    paths that reach the same state (the same words, trie node and last symbol: the same LM score)."""

    def add(words: tuple[str, ...], node: _Node, last: int, blank: float, symbol: float, lm: float) -> None:
        key = (words, id(node), last)
        b = beams.get(key)
        if b is None:
            beams[key] = _Beam(words, node, last, blank, symbol, lm)
        else:
            b.blank, b.symbol = _logaddexp(b.blank, blank), _logaddexp(b.symbol, symbol)

    return add


class BeamSearchDecoder:
    """CTC prefix beam search with a lexicon and a word n-gram model (see the module docstring).

    Words are spelled in the model's symbols: letters (the alphabet has a space, which must separate words), or
    phonemes (the language model carries `pronunciations`, word -> phoneme sequences; words follow each other with no
    separator, as in speech). `alpha` weighs the language model, `beta` is a bonus per word (balances the LM's pull
    towards fewer words), `beam_width` hypotheses are kept per frame, and symbols scoring below `prune`
    (log-probability) in a frame are not tried."""

    def __init__(
        self,
        alphabet: Sequence[str],
        lm: NGramLM,
        alpha: float = LM_WEIGHT,
        beta: float = WORD_BONUS,
        beam_width: int = 32,
        prune: float = -8.0,
    ) -> None:
        self.alphabet, self.lm = list(alphabet), lm
        index = {s: i for i, s in enumerate(self.alphabet)}
        if lm.pronunciations is not None:
            self.separator = None
            prons = {
                w: [tuple(index[p] for p in pron) for pron in ps if all(p in index for p in pron)]
                for w, ps in lm.pronunciations.items()
            }
        else:
            if " " not in index:
                raise ValueError(
                    "the alphabet has no space to separate spelled words, and the language model has no "
                    "pronunciations (a phoneme model needs them)"
                )
            self.separator = index[" "]
            prons = {w: [tuple(index[c] for c in w)] for w in lm.vocab if w != EOS and all(c in index for c in w)}
        self.alpha, self.beta, self.beam_width, self.prune = alpha, beta, beam_width, prune
        self.root = _build_trie({w: p for w, p in prons.items() if p}, lm.unigram_log_prob)

    def _word_score(self, words: tuple[str, ...], word: str) -> float:
        context = (BOS, BOS, *words)[-2:]
        return self.alpha * self.lm.log_prob(context[0], context[1], word) + self.beta

    def _rank(self, b: _Beam) -> float:
        """How a hypothesis competes: its CTC probability, its finished words' LM score, and what its unfinished
        word can at best add (the lookahead), so that half-spelled words are not favoured over finished ones."""
        return _logaddexp(b.blank, b.symbol) + b.lm + self.alpha * b.node.lookahead

    def decode(self, log_probs: np.ndarray) -> str:
        """(T', V) log-probabilities of one clip -> the best word sequence."""
        log_probs = np.asarray(log_probs, dtype=np.float64)
        beams = [_Beam((), self.root, -1, 0.0, -math.inf, 0.0)]
        for frame in log_probs:
            candidates = [int(i) for i in np.nonzero(frame >= self.prune)[0] if i != 0]
            nxt: dict[tuple[Any, ...], _Beam] = {}

            add = _merger(nxt)

            for b in beams:
                total = _logaddexp(b.blank, b.symbol)
                add(b.words, b.node, b.last, total + frame[0], -math.inf, b.lm)  # a blank: nothing new
                for i in candidates:
                    p = frame[i]
                    if i == b.last:  # the same symbol again without a blank: nothing new either
                        add(b.words, b.node, b.last, -math.inf, b.symbol + p, b.lm)
                        base = b.blank + p  # a new occurrence of the symbol needs a blank before it
                        if base == -math.inf:
                            continue
                    else:
                        base = total + p
                    if i == self.separator:  # letters: the space finishes the word spelled so far
                        for word in b.node.words if b.node is not self.root else ():
                            add((*b.words, word), self.root, i, -math.inf, base, b.lm + self._word_score(b.words, word))
                        continue
                    child = b.node.children.get(i)
                    if child is not None:  # the unfinished word goes on
                        add(b.words, child, i, -math.inf, base, b.lm)
                    if self.separator is None and b.node.words:  # phonemes: a word ends here, the next one starts
                        first = self.root.children.get(i)
                        if first is not None:
                            for word in b.node.words:
                                score = b.lm + self._word_score(b.words, word)
                                add((*b.words, word), first, i, -math.inf, base, score)
            beams = heapq.nlargest(self.beam_width, nxt.values(), key=self._rank)
        # finish: an unfinished word must be a whole word; then the end of the sentence
        best, best_score = (), -math.inf
        for b in beams:
            base = _logaddexp(b.blank, b.symbol) + b.lm
            endings = [(b.words, base)] if b.node is self.root else []
            endings += [((*b.words, w), base + self._word_score(b.words, w)) for w in b.node.words]
            for words, score in endings:
                context = (BOS, BOS, *words)[-2:]
                score += self.alpha * self.lm.log_prob(context[0], context[1], EOS)
                if score > best_score:
                    best, best_score = words, score
        return " ".join(best)
