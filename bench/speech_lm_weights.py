"""Choose the beam search's language-model weight (alpha) and word bonus (beta) on the dev set of a trained
recognizer: the 200 training-manifest clips `lmforge speech train` held out (unseen sentences, training voices),
never the test set.

    python bench/speech_lm_weights.py runs/speech runs/speech-corpus [--seed 0] [--dev-size 200]

Prints WER / CER for each (alpha, beta) of the grid and the best pair.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from lmforge.models.speech_ctc import SpeechEncoderForCTC
from lmforge.speech import load_audio, log_mel_spectrogram
from lmforge.speech.ctc_decode import BeamSearchDecoder
from lmforge.speech.recipe import ctc_log_probs, error_rates, split_dev
from lmforge.speech.synth import read_manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-size", type=int, default=200)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.4, 0.6, 0.8, 1.0, 1.3])
    p.add_argument("--betas", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 3.0])
    a = p.parse_args()
    model = SpeechEncoderForCTC.from_pretrained(a.model)
    _, dev = split_dev(read_manifest(Path(a.corpus) / "train.jsonl"), a.dev_size, a.seed)
    features = [log_mel_spectrogram(load_audio(r["audio"]), n_samples=None)[0] for r in dev]
    log_probs = ctc_log_probs(model, features)
    refs = [r["text"] for r in dev]
    results = []
    for alpha, beta in itertools.product(a.alphas, a.betas):
        started = time.perf_counter()
        decoder = BeamSearchDecoder(model.config.alphabet, model.language_model, alpha=alpha, beta=beta)
        rates = error_rates(refs, [decoder.decode(lp) for lp in log_probs])
        results.append((rates["wer"], alpha, beta))
        print(f"alpha {alpha:.2f} beta {beta:.2f}: WER {100 * rates['wer']:.2f}% CER {100 * rates['cer']:.2f}% "
              f"({time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip
    wer, alpha, beta = min(results)
    print(f"best on {len(dev)} dev clips: alpha {alpha} beta {beta} (WER {100 * wer:.2f}%)")


if __name__ == "__main__":
    main()
