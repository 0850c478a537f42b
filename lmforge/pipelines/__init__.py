"""Pipelines: one call from text to predictions, Hugging Face-shaped.

    from lmforge import pipeline
    pipeline("text-classification", model="runs/sentiment")(["great film", "dull"])
    pipeline("text-generation", model="runs/shakespeare")("ROMEO:", max_new_tokens=40)

Modules: base.py (the Pipeline class: batching by length, input checks, truncation), factory.py
(`pipeline`), and one module per task: text_generation.py, text_classification.py, fill_mask.py,
token_classification.py, question_answering.py, feature_extraction.py (also sentence-embeddings),
zero_shot.py (zero-shot-classification, few-shot prompting), text2text.py (text2text-generation,
translation, summarization with encoder-decoders), speech_recognition.py (automatic-speech-recognition with
Whisper); knowledge_base.py (KnowledgeBase: retrieve
chunks of your files, then answer from them) with chunking.py (documents cut into overlapping passages) and
knowledge_store.py (a knowledge base's saved folder).
Names are imported on first use, so `import lmforge.pipelines` loads nothing heavy.
"""

from __future__ import annotations

from lmforge.lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    "pipeline": "lmforge.pipelines.factory",
    "available_tasks": "lmforge.pipelines.factory",
    "Pipeline": "lmforge.pipelines.base",
    "TextGenerationPipeline": "lmforge.pipelines.text_generation",
    "BadWordsLogitsProcessor": "lmforge.pipelines.text_generation",
    "Text2TextGenerationPipeline": "lmforge.pipelines.text2text",
    "TranslationPipeline": "lmforge.pipelines.text2text",
    "SummarizationPipeline": "lmforge.pipelines.text2text",
    "TextClassificationPipeline": "lmforge.pipelines.text_classification",
    "FillMaskPipeline": "lmforge.pipelines.fill_mask",
    "TokenClassificationPipeline": "lmforge.pipelines.token_classification",
    "QuestionAnsweringPipeline": "lmforge.pipelines.question_answering",
    "FeatureExtractionPipeline": "lmforge.pipelines.feature_extraction",
    "AutomaticSpeechRecognitionPipeline": "lmforge.pipelines.speech_recognition",
    "ZeroShotClassificationPipeline": "lmforge.pipelines.zero_shot",
    "FewShotClassifier": "lmforge.pipelines.zero_shot",
    "few_shot_prompt": "lmforge.pipelines.zero_shot",
    "KnowledgeBase": "lmforge.pipelines.knowledge_base",
    "chunk_text": "lmforge.pipelines.chunking",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
