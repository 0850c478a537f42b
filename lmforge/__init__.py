"""lmforge: a compact, readable PyTorch toolkit for pretrained Transformer language models.

Importing the package is cheap: heavy modules are loaded on first attribute access.
"""

from __future__ import annotations

from lmforge.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, so `import lmforge` stays fast)
_EXPORTS = {
    "GPTConfig": "lmforge.config",
    "GPTForCausalLM": "lmforge.models.gpt",
    "GPTForSequenceClassification": "lmforge.models.gpt",
    "GPTModel": "lmforge.models.gpt",
    "CausalLMOutput": "lmforge.models.outputs",
    "SequenceClassifierOutput": "lmforge.models.outputs",
    "Tokenizer": "lmforge.tokenizer",
    "GenerationConfig": "lmforge.generation",
    "sample_next_token": "lmforge.generation",
    "TrainingArguments": "lmforge.training.args",
    "Trainer": "lmforge.training.trainer",
    "TrainerCallback": "lmforge.training.reporting",
    "EvalPrediction": "lmforge.training.metrics",
    "DataCollator": "lmforge.data.collate",
    "KnowledgeBase": "lmforge.pipelines",
    "ZeroShotClassificationPipeline": "lmforge.pipelines",
    "plot_attention": "lmforge.interpret",
    "attention_maps": "lmforge.interpret",
    "plot_cross_attention": "lmforge.interpret",
    "cross_attention_maps": "lmforge.interpret",
    "token_attributions": "lmforge.interpret",
    "LoRAConfig": "lmforge.nn.lora",
    "apply_lora": "lmforge.nn.lora",
    "merge_and_unload": "lmforge.nn.lora",
    "save_adapters": "lmforge.nn.lora",
    "load_adapters": "lmforge.nn.lora",
    "AutoConfig": "lmforge.auto",
    "AutoTokenizer": "lmforge.auto",
    "AutoModelForCausalLM": "lmforge.auto",
    "AutoModelForSequenceClassification": "lmforge.auto",
    "AutoModel": "lmforge.auto",
    "AutoModelForMaskedLM": "lmforge.auto",
    "AutoModelForPreTraining": "lmforge.auto",
    "AutoModelForTokenClassification": "lmforge.auto",
    "AutoModelForQuestionAnswering": "lmforge.auto",
    "AutoModelForSeq2SeqLM": "lmforge.auto",
    "AutoModelForCTC": "lmforge.auto",
    "AutoModelForSpeechSeq2Seq": "lmforge.auto",
    "WhisperConfig": "lmforge.models.whisper",
    "WhisperForConditionalGeneration": "lmforge.models.whisper",
    "WhisperModel": "lmforge.models.whisper",
    "WhisperFeatureExtractor": "lmforge.speech",
    "load_audio": "lmforge.speech",
    "Seq2SeqConfig": "lmforge.models.seq2seq",
    "Seq2SeqForConditionalGeneration": "lmforge.models.seq2seq",
    "MarianConfig": "lmforge.models.seq2seq",
    "MarianMTModel": "lmforge.models.seq2seq",
    "BartConfig": "lmforge.models.seq2seq",
    "BartForConditionalGeneration": "lmforge.models.seq2seq",
    "Seq2SeqLMOutput": "lmforge.models.outputs",
    "BertConfig": "lmforge.config",
    "BertModel": "lmforge.models.bert",
    "BertForMaskedLM": "lmforge.models.bert",
    "BertForPreTraining": "lmforge.models.bert",
    "BertForSequenceClassification": "lmforge.models.bert",
    "BertForTokenClassification": "lmforge.models.bert",
    "BertForQuestionAnswering": "lmforge.models.bert",
    "MaskedLMOutput": "lmforge.models.outputs",
    "TokenClassifierOutput": "lmforge.models.outputs",
    "QuestionAnsweringModelOutput": "lmforge.models.outputs",
    "pipeline": "lmforge.pipelines",
    "Pipeline": "lmforge.pipelines",
    "TextGenerationPipeline": "lmforge.pipelines",
    "TextClassificationPipeline": "lmforge.pipelines",
    "FillMaskPipeline": "lmforge.pipelines",
    "TokenClassificationPipeline": "lmforge.pipelines",
    "QuestionAnsweringPipeline": "lmforge.pipelines",
    "FeatureExtractionPipeline": "lmforge.pipelines",
}
# Hugging Face's names for the same classes, so a script needs only its import line changed.
_ALIASES = {
    "GPT2Config": ("lmforge.config", "GPTConfig"),
    "GPT2LMHeadModel": ("lmforge.models.gpt", "GPTForCausalLM"),
    "GPT2ForSequenceClassification": ("lmforge.models.gpt", "GPTForSequenceClassification"),
    "GPT2Tokenizer": ("lmforge.tokenizer", "Tokenizer"),
    "GPT2TokenizerFast": ("lmforge.tokenizer", "Tokenizer"),
    "BertTokenizer": ("lmforge.tokenizer", "Tokenizer"),
    "BertTokenizerFast": ("lmforge.tokenizer", "Tokenizer"),
    "PreTrainedTokenizerFast": ("lmforge.tokenizer", "Tokenizer"),
    "MarianTokenizer": ("lmforge.tokenizer", "MarianTokenizer"),
    "WhisperTokenizer": ("lmforge.tokenizer", "Tokenizer"),
    "WhisperTokenizerFast": ("lmforge.tokenizer", "Tokenizer"),
}

__all__ = sorted(_EXPORTS) + sorted(_ALIASES) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, {**_EXPORTS, **_ALIASES})
