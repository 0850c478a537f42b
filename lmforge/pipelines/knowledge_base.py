"""Knowledge-base question answering: find the passages of your files that match a question, then answer.

    kb = KnowledgeBase.build("notes/", embedder="path/to/all-MiniLM-L6-v2")   # read, chunk, embed
    kb.save("notes.kb")                                # embeddings.safetensors + chunks.jsonl + index.json
    kb = KnowledgeBase.load("notes.kb")                # the embedder named in index.json loads on first use
    kb.search("how tall is the tower?", top_k=5)       -> [{"score", "text", "source", "start", "end"}, ...]
    kb.ask("how tall is the tower?", reader="path/to/qa-model")
        -> {"answer", "score", "source", "start", "end", "sources": [...]}   (offsets into the source file)
    kb.ask(question, generator="path/to/gpt")          -> {"answer", "score": None, "sources": [...]}
    kb.ask(question)                                   -> the best chunk is the answer

Files (.txt, .md, .markdown; .jsonl with a "text" per line) are read as UTF-8 and cut into overlapping
chunks of at most `chunk_chars` characters, at a paragraph end if one is near the limit, else at a
sentence end (. ! ? and 。！？), else between words. A chunk with more tokens than the embedder takes
is cut again, smaller, so no chunk is truncated by the embedder. Each chunk keeps its source and its
character offsets: `text[start:end] == chunk text`, where `text` is the file read with
`open(path, encoding="utf-8-sig", newline="").read()` (for a .jsonl: that line's "text").

Retrieval embeds the chunks with a sentence-embedding pipeline (normalised vectors) and ranks them by
cosine similarity with the question's vector (a dot product of unit vectors). The cutting is in chunking.py,
the saved folder's format in knowledge_store.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.pipelines.chunking import chunk_text, fit_to_tokens
from lmforge.pipelines.factory import pipeline
from lmforge.pipelines.feature_extraction import FeatureExtractionPipeline
from lmforge.pipelines.knowledge_store import Chunk, read_store, write_store
from lmforge.pipelines.text_generation import TextGenerationPipeline
from lmforge.textio import read_text

SUFFIXES = (".txt", ".md", ".markdown", ".jsonl")
DEFAULT_PROMPT = "Answer the question using the context.\n\nContext:\n{context}\n\nQuestion: {question}\nAnswer:"


# ---------------------------------------------------------------------------- reading files
def _find_files(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[Path, str]]:
    """(path, source name) of every file to index: a folder's files (recursively, hidden ones skipped)
    are named by their path inside it; a file given directly by its path as given."""
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    found: list[tuple[Path, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(path)
                if (
                    file.is_file()
                    and file.suffix.lower() in SUFFIXES
                    and not any(part.startswith(".") for part in relative.parts)
                ):
                    found.append((file, relative.as_posix()))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ValueError(f"{path} is not a .txt, .md or .jsonl file; the knowledge base reads {SUFFIXES}")
            found.append((path, path.as_posix()))
        else:
            raise FileNotFoundError(f"{path} does not exist; pass a folder of .txt/.md/.jsonl files or such files")
    names = [name for _, name in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"two files would have the same source name {repeated}; index one folder, or give the "
            "files by distinct paths"
        )
    return found


def read_documents(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[tuple[str, str]]:
    """(source name, text) of every document: one per .txt/.md file, one per line of a .jsonl file
    (named "file.jsonl#LINE", 1-based)."""
    documents: list[tuple[str, str]] = []
    for path, name in _find_files(sources):
        text = read_text(path, allow_empty=True)  # UTF-8, BOM dropped; errors name the file and the fix
        if path.suffix.lower() != ".jsonl":
            documents.append((name, text))
            continue
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path} line {number} is not JSON ({err}); each line must be an object with a 'text'"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(
                    f'{path} line {number} has no \'text\' string; each line must be an object like {{"text": "..."}}'
                )
            documents.append((f"{name}#{number}", record["text"]))
    return documents


# ---------------------------------------------------------------------------- the embedder
def _embedder_dims(embedder: Any) -> int:
    config = embedder.model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def _embedder_name(name_or_path: Any) -> str | None:
    """What index.json records to load the embedder again: an existing folder as an absolute path,
    else the model id as given."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def _resolve_embedder(embedder: Any) -> tuple[Any, str | None]:
    """A sentence-embedding pipeline and its name from a pipeline or a model folder / id."""
    if isinstance(embedder, (str, os.PathLike)):
        return pipeline("sentence-embeddings", model=embedder), _embedder_name(embedder)
    if not isinstance(embedder, FeatureExtractionPipeline):
        raise TypeError(
            f"embedder must be a sentence-embeddings pipeline or a model folder / id, got {type(embedder).__name__}"
        )
    if embedder.options.get("pooling") is None:
        raise TypeError(
            "embedder gives token vectors (feature-extraction); use a sentence-embeddings pipeline: "
            "pipeline('sentence-embeddings', model=...)"
        )
    return embedder, _embedder_name(getattr(embedder, "name_or_path", None))


def _embed(embedder: Any, texts: list[str], batch_size: int = 32) -> Tensor:
    """Unit-length embeddings (len(texts), D) of `texts`."""
    vectors = embedder(texts, return_tensors=True, normalize=True, batch_size=batch_size)
    return torch.stack(vectors).to(torch.float32)


# ---------------------------------------------------------------------------- the knowledge base
class KnowledgeBase:
    """Chunks of documents with their unit-length embeddings (N, D); search by cosine similarity, and
    answer questions from the best chunks (see the module doc).

    Build with `KnowledgeBase.build(...)` or `KnowledgeBase.load(dir)`; `info` is what index.json holds
    besides the format fields (embedder, chunking, roots, documents).
    """

    def __init__(self, embeddings: Tensor, chunks: Sequence[Chunk], info: dict[str, Any], embedder: Any = None) -> None:
        if embeddings.dim() != 2 or embeddings.size(0) != len(chunks):
            raise ValueError(
                f"embeddings must be (N, D) with one row per chunk: got {tuple(embeddings.shape)} for "
                f"{len(chunks)} chunks"
            )
        self.embeddings = embeddings.detach().to("cpu", torch.float32).contiguous()  # (N, D) unit rows
        self.chunks = list(chunks)
        self.info = info
        self._embedder: Any = None
        if embedder is not None:
            self.embedder = embedder

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"KnowledgeBase({len(self)} chunks, {self.dims} dims, embedder={self.info['embedder'].get('model')!r})"

    @property
    def dims(self) -> int:
        """D, the length of the embedding vectors."""
        return self.embeddings.size(1)

    @property
    def embedder(self) -> Any:
        """The sentence-embedding pipeline; loaded from the model named in index.json on first use."""
        if self._embedder is None:
            name = self.info["embedder"].get("model")
            if not name:
                raise ValueError(
                    "this knowledge base does not name its embedder (it was built from a model object); "
                    "pass KnowledgeBase.load(directory, embedder=...) with the same embedder"
                )
            try:
                self.embedder = name
            except FileNotFoundError as err:
                raise FileNotFoundError(
                    f"cannot load the embedder {name!r} this knowledge base was built with "
                    f"({err}); pass KnowledgeBase.load(directory, embedder=...)"
                ) from None
        return self._embedder

    @embedder.setter
    def embedder(self, embedder: Any) -> None:
        pipe, _ = _resolve_embedder(embedder)
        if _embedder_dims(pipe) != self.dims:
            raise ValueError(
                f"the embedder gives {_embedder_dims(pipe)}-dim vectors, but this knowledge base holds "
                f"{self.dims}-dim ones (built with {self.info['embedder'].get('model')!r}); use the "
                "embedder it was built with"
            )
        self._embedder = pipe

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        folder_or_files: str | os.PathLike | Iterable[str | os.PathLike],
        embedder: Any,
        chunk_chars: int = 600,
        overlap: int = 100,
        batch_size: int = 32,
    ) -> KnowledgeBase:
        """Read, chunk and embed documents.

        Args:
            folder_or_files: a folder (its .txt/.md/.markdown/.jsonl files, recursively), a file, or a list.
            embedder: a sentence-embeddings pipeline, or a model folder / cached id to load as one.
            chunk_chars: the most characters in a chunk (chunks are also cut to the embedder's length).
            overlap: up to this many characters are shared by consecutive chunks (<= chunk_chars // 2).
            batch_size: texts per forward pass of the embedder.
        """
        chunk_text("", chunk_chars, overlap)  # bad settings fail before any file is read
        documents = read_documents(folder_or_files)
        pipe, name = _resolve_embedder(embedder)
        max_tokens = pipe._limit(pipe.options.get("max_length"))
        specials = pipe.tokenizer.backend.num_special_tokens_to_add(False)

        def count(texts: list[str]) -> list[int]:
            return [len(ids) + specials for ids in pipe.tokenizer.encode_batch_fast(texts)]

        chunks = []
        for source, text in documents:
            spans = fit_to_tokens(text, chunk_text(text, chunk_chars, overlap), count, max_tokens, overlap)
            chunks += [Chunk(text[s:e], source, s, e) for s, e in spans]
        if not chunks:
            raise ValueError(
                f"no text to index in {folder_or_files!r}: no .txt, .md or .jsonl file with text was found"
            )
        roots = [folder_or_files] if isinstance(folder_or_files, (str, os.PathLike)) else list(folder_or_files)
        info = {
            "embedder": {
                "model": name,
                "pooling": pipe.options.get("pooling"),
                "normalize": True,
                "max_length": max_tokens,
            },
            "chunking": {"chunk_chars": chunk_chars, "overlap": overlap},
            "roots": [str(Path(r).resolve()) for r in roots],
            "documents": len(documents),
        }
        embeddings = _embed(pipe, [c.text for c in chunks], batch_size)  # (N, D)
        return cls(embeddings, chunks, info, embedder=pipe)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Write embeddings.safetensors (float32 (N, D)), chunks.jsonl and index.json into `directory`,
        atomically (see `lmforge.pipelines.knowledge_store`)."""
        return write_store(directory, self.embeddings, self.chunks, self.info)

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder: Any = None) -> KnowledgeBase:
        """Read a folder written by `save`, checking that its three files agree. `embedder` (a pipeline
        or model folder / id) overrides the one named in index.json, which otherwise loads on first use."""
        embeddings, chunks, info = read_store(directory)
        return cls(embeddings, chunks, info, embedder=embedder)

    # ------------------------------------------------------------------ retrieval
    def search(self, query: str, top_k: int = 5) -> list[dict[str, Any]]:
        """The `top_k` chunks most similar to `query`, best first: {"score" (cosine similarity), "text",
        "source", "start", "end"}."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"query must be a non-empty str, got {query!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        q = _embed(self.embedder, [query])[0]  # (D,)
        scores = self.embeddings @ q  # (N,) cosine similarities
        values, indices = scores.topk(min(top_k, len(self)))
        return [{"score": float(v), **asdict(self.chunks[i])} for v, i in zip(values.tolist(), indices.tolist())]

    def ask(
        self,
        question: str,
        top_k: int = 3,
        reader: Any = None,
        generator: Any = None,
        prompt_template: str = DEFAULT_PROMPT,
        generation_options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Answer `question` from the `top_k` best chunks.

        - `reader` (extractive): a question-answering pipeline, a QA model folder / id, or any callable
          `reader(question=..., context=...) -> {"answer", "score", "start", "end"}`. It reads each chunk;
          the answer with the best reader score wins. The result adds its "source" and its "start"/"end"
          in the source text.
        - `generator`: a text-generation pipeline, a causal-LM folder / id, or a callable
          `generator(prompt, **options) -> [{"generated_text"}]`. It continues `prompt_template` filled
          with the chunks (best last, next to the question, so a prompt cut to the model's context loses
          the weakest) and the question; the answer is the first line it writes; "score" is None.
          `generation_options` go to the call (default max_new_tokens=64, greedy).
        - neither: the best chunk is the answer, its similarity the score.

        Returns {"answer", "score", "sources": [{"source", "start", "end", "score", "text"}, ...]} (the
        retrieved chunks, best first), plus "source", "start", "end" for a reader or no reader.
        """
        if reader is not None and generator is not None:
            raise ValueError("pass reader= (extractive QA) or generator= (a text generator), not both")
        if isinstance(reader, TextGenerationPipeline):
            reader, generator = None, reader
        hits = self.search(question, top_k)
        if generator is not None:
            return self._generate(question, hits, generator, prompt_template, generation_options)
        if reader is not None:
            return self._extract(question, hits, reader)
        best = hits[0]
        return {
            "answer": best["text"],
            "score": best["score"],
            "source": best["source"],
            "start": best["start"],
            "end": best["end"],
            "sources": hits,
        }

    @staticmethod
    def _extract(question: str, hits: list[dict[str, Any]], reader: Any) -> dict[str, Any]:
        if isinstance(reader, (str, os.PathLike)):
            reader = pipeline("question-answering", model=reader)
        if not callable(reader):
            raise TypeError(
                f"reader must be a question-answering pipeline, a model folder / id or a callable, got "
                f"{type(reader).__name__}"
            )
        best: tuple[dict[str, Any], dict[str, Any]] | None = None
        for hit in hits:
            result = reader(question=question, context=hit["text"])
            result = result[0] if isinstance(result, list) else result  # a reader asked for top_k > 1
            if not isinstance(result, dict) or not {"answer", "score", "start", "end"} <= set(result):
                raise TypeError(f"the reader must return {{'answer', 'score', 'start', 'end'}}, got {result!r}")
            if best is None or result["score"] > best[0]["score"]:
                best = (result, hit)
        assert best is not None
        answer, hit = best
        return {
            "answer": answer["answer"],
            "score": float(answer["score"]),
            "source": hit["source"],
            "start": hit["start"] + int(answer["start"]),
            "end": hit["start"] + int(answer["end"]),
            "sources": hits,
        }

    @staticmethod
    def _generate(
        question: str,
        hits: list[dict[str, Any]],
        generator: Any,
        prompt_template: str,
        generation_options: dict[str, Any] | None,
    ) -> dict[str, Any]:
        if "{context}" not in prompt_template or "{question}" not in prompt_template:
            raise ValueError("prompt_template needs {context} and {question}")
        if isinstance(generator, (str, os.PathLike)):
            generator = pipeline("text-generation", model=generator)
        if not callable(generator):
            raise TypeError(
                f"generator must be a text-generation pipeline, a model folder / id or a callable, got "
                f"{type(generator).__name__}"
            )
        context = "\n\n".join(hit["text"] for hit in reversed(hits))  # best last: next to the question
        prompt = prompt_template.format(context=context, question=question)
        out = generator(prompt, **{"max_new_tokens": 64, "return_full_text": False, **(generation_options or {})})
        out = out[0] if isinstance(out, list) else out
        text = out["generated_text"] if isinstance(out, dict) else out
        if not isinstance(text, str):
            raise TypeError(f"the generator must return [{{'generated_text': str}}], got {out!r}")
        return {"answer": text.strip().split("\n", 1)[0].strip(), "score": None, "sources": hits}
