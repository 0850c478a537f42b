"""Model families: one readable file each. Each family registers its classes (`registry.register`)
when its file is imported; the list below is the one place that names the families."""

from lmforge.models import bert, gpt, seq2seq, speech_ctc, whisper  # noqa: F401  (imported for their registrations)
