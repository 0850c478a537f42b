"""Tokenizers with a Hugging Face-shaped API over the Rust ``tokenizers`` library.

``from lmforge.tokenizer import Tokenizer`` is the entry point. The package, one job per file:
  - ``core.py``: the ``Tokenizer`` class: ``__call__`` (padding, truncation, masks, tensors), encode/decode,
    special-token roles, ``save_pretrained`` / ``from_pretrained`` / ``from_file``, the training classmethods;
  - ``batch.py``: ``BatchEncoding`` and the argument checks, padding and tensors behind ``__call__``;
  - ``backends.py``: the ``tokenizers`` pipelines built here (GPT-2 byte-level BPE, BERT WordPiece, templates);
  - ``train.py``: training byte-level BPE and WordPiece on text files (read by ``lmforge.textio``) or iterators;
  - ``layout.py``: the Hugging Face tokenizer directory: ``tokenizer.json`` and its config files, read and
    written, and the table of ``tokenizer_class`` names;
  - ``legacy.py``: legacy files of checkpoints without ``tokenizer.json``: GPT-2's ``vocab.json`` +
    ``merges.txt``, BERT's ``vocab.txt`` (with ``added_tokens.json`` and the config files beside them);
  - ``marian.py``: ``MarianTokenizer``, Marian's two SentencePiece models over one shared ``vocab.json``.
"""

from lmforge.tokenizer.batch import BatchEncoding
from lmforge.tokenizer.core import Tokenizer
from lmforge.tokenizer.layout import SPECIAL_TOKEN_ROLES
from lmforge.tokenizer.marian import MarianTokenizer

__all__ = ["SPECIAL_TOKEN_ROLES", "BatchEncoding", "MarianTokenizer", "Tokenizer"]
