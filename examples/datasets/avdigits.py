#!/usr/bin/python3
"""AV-digits: the AV-MNIST protocol of the multimodal literature (MultiBench) built from real data,
written as a dataset folder in confsmoe-train's layout (docs/TRAIN.md, "The dataset folder").

    /usr/bin/python3 examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out build/avdigits
    /usr/bin/python3 examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out build/avdigits-same \\
        --same-tokens
    /usr/bin/python3 examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out build/avdigits-hard \\
        --hard --same-tokens

Sources.
  Audio: the Free Spoken Digit Dataset (FSDD; FSDD_DIR/recordings/{digit}_{speaker}_{index}.wav, mono
  8 kHz 16-bit PCM; 6 speakers x 10 digits x 50 recordings; CC BY-SA 4.0). FSDD's usual split: index
  0-4 = test, 5-49 = train (the same six speakers are in both splits, different utterances).
  Image: the pix view of data/handwritten (UCI Multiple Features, CC BY 4.0): 240 pixel averages
  (integers 0..6, 0 = background) of a 16-row x 15-column image, stored row-major (rendering the
  rows as text shows upright digits); its split_tmc.csv gives 0 = train, 1 = test.

Samples and pairing. One sample per recording, in the order (digit, speaker, index); the sample's
split is the recording's FSDD split and its label the spoken digit. Each sample is paired with a
handwritten image of the same class from the same split: for each (split, class), the class's
images in that split are put in a seeded order (Python's random.Random(--seed).shuffle, one stream
over the (split, class) pairs in the order train/test x 0..9) and the class's recordings take them
in turn, cycling. The full FSDD has 270 train recordings and 160 train images per class (each image
is used once or twice) and 30 test recordings for 40 test images per class (every test image is
distinct). The test split therefore shares no recording and no image with train. pairing.csv names
the recording and the image row (0-based row of data/handwritten/view0_pix.csv) of each sample.

Audio tokens: log-mel frames, numpy only (no audio library).
  - The waveform (int16 / 32768) is cut or zero-padded at the end to FRAME + (S_audio - 1) x HOP
    samples; the recordings are trimmed at the speech onset, so the start is kept.
  - STFT: frame t is samples [t HOP, t HOP + FRAME) times a periodic Hann window
    w[n] = 0.5 - 0.5 cos(2 pi n / FRAME), its power spectrum |rfft|^2 over FRAME // 2 + 1 bins
    (FRAME = 256 = 32 ms, HOP = 100 = 12.5 ms; bin spacing 31.25 Hz).
  - Mel filterbank: F_audio triangular filters on the HTK mel scale, mel(f) = 2595 log10(1 + f/700)
    (O'Shaughnessy 1987, as in the HTK Book; 1000 Hz = 1000 mel), centres equally spaced in mel
    between 0 Hz and the Nyquist frequency 4000 Hz; filter m rises linearly in mel from centre m-1
    to 1 at centre m and falls to 0 at centre m+1 (unnormalised, HTK's convention).
  - Token t = ln(max(mel energy, 1e-6)) per band, written with 2 decimals. Padding frames are
    silence and sit at the floor ln(1e-6) = -13.82.
  Defaults: S_audio = 50 frames (the paper's 50 tokens; 50 frames span 0.645 s and hold the whole
  recording for 94% of FSDD, median length 0.42 s) and F_audio = 40 bands: 2000 values per row.
Image tokens: the 16 pixel rows of 15 pixels: S_image = 16, F_image = 15.

Degradations (off by default; AV-MNIST's, Vielzeuf et al. 2018 as used by MultiBench, keeps 25% of
the image energy and mixes environmental noise into the audio so that each modality alone is weak):
  --image-energy E   PCA of the images: mean and covariance of the TRAIN images of data/handwritten
      (split_tmc 0, each image once; test images play no part), components = the fewest leading
      eigenvectors whose eigenvalues hold a share >= E of the total variance; every image is projected
      onto them and reconstructed, written with 2 decimals. E = 1 writes the integer pixels unchanged.
      The pix view needs 2 components for E = 0.25 (they hold 28.1%) and 6 for E = 0.5 (49.9% with 5).
  --audio-snr DB     noise added to the waveform before the STFT: the recording is cut or zero-padded
      to its analysis window (FRAME + (S_audio - 1) x HOP samples) and noise over the whole window is
      scaled so that the power of the recording's own samples over the noise power on those samples
      is DB (noisy_waveform). The noise fills the padding too, so the clip has no silent tail that
      would give the duration away.
  --noise babble (default) | white
      babble: FSDD's own speech as the interference (a "cocktail party": noise with the spectrum and
      the time structure of speech, where white noise is flat and stationary; the white variant
      was not measured in the grid). BABBLE_TALKERS = 4 streams, each a concatenation of
      recordings scaled to unit RMS, drawn with numpy's Generator seeded with (--seed, sample index)
      from the recordings of the SAME split (test audio never enters train, nor the reverse) spoken
      by the OTHER speakers. The drawn digits are not restricted: excluding the sample's own digit
      would let the noise tell which digits the label is not.
      white: Gaussian, from the Generator seeded with (--seed, sample index).
  --hard             the preset: --image-energy 0.25 --audio-snr 0 --noise babble, chosen with
      examples/datasets/hard_grid.py on the floor's VALIDATION accuracy at r = 0 (never on test): the
      cell of the grid E in {1, 0.5, 0.25} x SNR in {off, 10, 0, -5} dB whose two-view floor is in
      60-80% with the largest margin over the better single view. Floors (validation / test):
      r = 0: both views 80.0% / 78.7%, audio alone 53.3% / 54.7%, image alone 58.1% / 63.0%;
      r = 0.3: both views 67.8% / 69.7% (clean data: 99.3% / 98.7% at r = 0, 98.1% / 98.7% at 0.3).
  The --seed draws both the pairing and the noise.

Output (the folder --out; created, and only this script's files in it are overwritten):
  labels.csv          N lines: the class 0..9
  view0_audio.csv     first line #tokens=S_audio, then N rows of S_audio x F_audio values, token-major
  view1_image.csv     first line #tokens=S_image, then N rows of S_image x 15 integers
  split.csv           N lines: 0 train, 1 test (the trainer carves its validation split from train)
  pairing.csv         header, then per sample: sample, split, label, recording, image_row
  SOURCE.md           origins, licences, parameters, counts and checksums
The folder is CC BY-SA 4.0 (share-alike, from FSDD's licence; the images are CC BY 4.0).

Token counts and the trainer. The trainer runs views of different S (docs/TRAIN.md, "Sequence
views"), so the default folder trains as it is (L = 50 + 16 tokens):
    build/examples/train/confsmoe-train --data build/avdigits --missing 0.3
--same-tokens writes both views with S = S_audio, for consumers that need one S: the 16 image rows
are centred in S_audio rows, the rest background rows (pixel 0), i.e. the digit on a taller blank
canvas (L = 100 tokens, about twice the training time).

The output is deterministic: the same inputs and flags give byte-identical files (for a given numpy).
stdlib + numpy only (/usr/bin/python3).
"""
import argparse
import hashlib
import math
import os
import random
import re
import sys
import time
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SAMPLE_RATE = 8000
FRAME = 256  # samples per STFT frame (32 ms) and FFT length
HOP = 100  # samples between frames (12.5 ms)
LOG_FLOOR = 1e-6  # mel energies below it are clipped before the log
IMAGE_ROWS, IMAGE_COLS = 16, 15
RECORDING_RE = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")
TEST_INDICES = range(0, 5)  # FSDD's usual split: recordings 0-4 of each speaker and digit are test
OUTPUT_FILES = ["labels.csv", "view0_audio.csv", "view1_image.csv", "split.csv", "pairing.csv", "SOURCE.md"]
SPLIT_NAMES = ("train", "test")
BABBLE_TALKERS = 4  # concurrent talkers in the babble noise
# --hard: the degradation chosen on the floor's validation accuracy (module docstring, "Hard").
HARD_IMAGE_ENERGY = 0.25
HARD_AUDIO_SNR = 0.0


class DataError(Exception):
    """Bad or missing input; the message names the file."""


# ----------------------------------------------------------------------------- signal processing


def read_wav(path):
    """Samples of a mono 16-bit PCM WAV as float64 in [-1, 1) (int16 / 32768) and its sample rate."""
    try:
        with wave.open(path, "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            comp = w.getcomptype()
            data = w.readframes(n)
    except (wave.Error, EOFError, OSError) as e:
        raise DataError("%s: not a readable WAV file (%s)" % (path, e)) from None
    if comp != "NONE" or width != 2 or channels != 1:
        raise DataError("%s: %d channel(s), %d-byte samples, compression %s; expected mono 16-bit PCM"
                        % (path, channels, width, comp))
    if len(data) != 2 * n or n == 0:
        raise DataError("%s: %d sample(s) in the header, %d bytes of data" % (path, n, len(data)))
    return np.frombuffer(data, dtype="<i2").astype(np.float64) / 32768.0, rate


def hann(n):
    """Periodic Hann window of length n: 0.5 - 0.5 cos(2 pi k / n), k = 0 .. n-1."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def stft_power(x, n_frames, frame=FRAME, hop=HOP):
    """Power spectra [n_frames, frame // 2 + 1] of x cut or zero-padded at the end to
    frame + (n_frames - 1) hop samples; frame t starts at sample t hop."""
    length = frame + (n_frames - 1) * hop
    padded = np.zeros(length)
    padded[:min(length, len(x))] = x[:length]
    idx = np.arange(n_frames)[:, None] * hop + np.arange(frame)[None, :]
    spectrum = np.fft.rfft(padded[idx] * hann(frame), n=frame, axis=1)
    return spectrum.real ** 2 + spectrum.imag ** 2


def hz_to_mel(f):
    """HTK mel scale (O'Shaughnessy 1987): 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_centres_hz(n_mels, fmin, fmax):
    """The n_mels centre frequencies, plus the two outer edges: n_mels + 2 points equally spaced in mel."""
    return mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))


def mel_filters_at(freqs, n_mels, fmin, fmax):
    """The triangular filters [n_mels, len(freqs)] evaluated at freqs (Hz): filter m is linear in mel,
    0 at point m, 1 at point m + 1 (its centre), 0 at point m + 2 of mel_centres_hz."""
    points = hz_to_mel(mel_centres_hz(n_mels, fmin, fmax))
    mel = hz_to_mel(freqs)[None, :]
    lower, centre, upper = points[:-2, None], points[1:-1, None], points[2:, None]
    rising = (mel - lower) / (centre - lower)
    falling = (upper - mel) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def mel_filterbank(n_mels, frame=FRAME, sample_rate=SAMPLE_RATE):
    """The filters on the rfft bins of a frame-sample FFT, from 0 Hz to the Nyquist frequency."""
    bins_hz = np.arange(frame // 2 + 1) * sample_rate / frame
    fb = mel_filters_at(bins_hz, n_mels, 0.0, sample_rate / 2.0)
    empty = np.nonzero(fb.sum(1) == 0)[0]
    if len(empty):
        raise DataError("%d mel bands leave filter %d without an FFT bin: use fewer bands" % (n_mels, empty[0]))
    return fb


def log_mel(x, n_frames, filterbank):
    """[n_frames, n_mels] natural log of the mel energies, clipped below at LOG_FLOOR."""
    return np.log(np.maximum(stft_power(x, n_frames) @ filterbank.T, LOG_FLOOR))


def analysis_length(n_frames, frame=FRAME, hop=HOP):
    """Samples the STFT of n_frames frames reads: frame + (n_frames - 1) hop."""
    return frame + (n_frames - 1) * hop


def noisy_waveform(x, n_frames, snr_db, noise):
    """x cut or zero-padded to the analysis window of n_frames frames, plus noise [window] scaled so
    that signal power / noise power = 10^(snr_db / 10), both powers taken over the recording's own
    samples inside the window (the padding is not signal). The noise continues, at the same scale,
    over the padding, so the clip has no silent tail."""
    length = analysis_length(n_frames)
    own = min(len(x), length)
    padded = np.zeros(length)
    padded[:own] = x[:own]
    signal_power = np.mean(padded[:own] ** 2)
    noise_power = np.mean(noise[:own] ** 2)
    if signal_power == 0 or noise_power == 0:
        raise DataError("noise at %g dB: the recording or its noise is all zeros" % snr_db)
    return padded + noise * np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))


def white_noise(sample, length, seed):
    """White Gaussian noise [length], from numpy's Generator seeded with (seed, sample index)."""
    return np.random.default_rng([seed, sample]).standard_normal(length)


def babble_noise(sample, recordings, waves, length, seed, talkers=BABBLE_TALKERS):
    """Babble [length]: the sum of `talkers` streams, each a concatenation of recordings scaled to unit
    RMS, drawn (Generator seeded with (seed, sample index)) from the recordings of the sample's split
    spoken by the other speakers, whatever their digit (see the module docstring)."""
    digit, speaker, _, _ = recordings[sample]
    split = recording_split(recordings[sample])
    pool = [j for j, r in enumerate(recordings) if recording_split(r) == split and r[1] != speaker]
    if not pool:
        raise DataError("babble for %s: no %s recording of another speaker" % (recordings[sample][3],
                                                                              SPLIT_NAMES[split]))
    rng = np.random.default_rng([seed, sample])
    babble = np.zeros(length)
    for _ in range(talkers):
        stream, filled = np.zeros(length), 0
        while filled < length:
            w = waves[pool[int(rng.integers(len(pool)))]]
            w = w / np.sqrt(np.mean(w ** 2))
            take = min(len(w), length - filled)
            stream[filled:filled + take] = w[:take]
            filled += take
        babble += stream
    return babble


# ----------------------------------------------------------------------------- image degradation


def pca_fit(train_images, energy):
    """(mean [D], components [k, D]) of the mean-centred train images: the leading eigenvectors of their
    covariance, k the fewest whose eigenvalues hold a share >= energy of the total variance."""
    x = np.asarray(train_images, np.float64)
    mean = x.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x - mean, rowvar=False, bias=True))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.clip(eigenvalues[order], 0.0, None), eigenvectors[:, order]
    share = np.cumsum(eigenvalues) / eigenvalues.sum()
    k = int(np.searchsorted(share, energy - 1e-12)) + 1  # tolerance: E = 1 keeps every component
    return mean, eigenvectors[:, :min(k, len(share))].T


def pca_reconstruct(images, mean, components):
    """The images projected onto the components' span (around the mean) and mapped back."""
    centred = np.asarray(images, np.float64) - mean
    return mean + (centred @ components.T) @ components


# ----------------------------------------------------------------------------- inputs


def find_recordings(fsdd):
    """[(digit, speaker, index, file name)] sorted by (digit, speaker, index)."""
    folder = os.path.join(fsdd, "recordings")
    if not os.path.isdir(folder):
        raise DataError("%s: no such folder (--fsdd names the FSDD folder holding recordings/)" % folder)
    found = []
    for name in os.listdir(folder):
        m = RECORDING_RE.match(name)
        if not m:
            if name.endswith(".wav"):
                raise DataError("%s: the name is not {digit}_{speaker}_{index}.wav" % os.path.join(folder, name))
            continue
        found.append((int(m.group(1)), m.group(2), int(m.group(3)), name))
    if not found:
        raise DataError("%s: no {digit}_{speaker}_{index}.wav recordings" % folder)
    return sorted(found)


def read_int_column(path):
    if not os.path.isfile(path):
        raise DataError("%s: no such file" % path)
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    try:
        return np.array([int(v) for v in lines], np.int64)
    except ValueError as e:
        raise DataError("%s: %s" % (path, e)) from None


def load_handwritten(folder):
    """(pixels int [N, 240], labels [N], split [N]) of the handwritten folder."""
    pix_path = os.path.join(folder, "view0_pix.csv")
    if not os.path.isfile(pix_path):
        raise DataError("%s: no such file (--handwritten names the data/handwritten folder)" % pix_path)
    pixels = np.loadtxt(pix_path, delimiter=",", dtype=np.int64, ndmin=2)
    if pixels.shape[1] != IMAGE_ROWS * IMAGE_COLS:
        raise DataError("%s: %d values per row, expected %d" % (pix_path, pixels.shape[1], IMAGE_ROWS * IMAGE_COLS))
    labels = read_int_column(os.path.join(folder, "labels.csv"))
    split = read_int_column(os.path.join(folder, "split_tmc.csv"))
    if not (len(labels) == len(split) == len(pixels)):
        raise DataError("%s: view0_pix.csv, labels.csv and split_tmc.csv have %d, %d and %d rows"
                        % (folder, len(pixels), len(labels), len(split)))
    return pixels, labels, split


def pair_images(recordings, image_labels, image_split, seed):
    """The image row of each recording: same class, same split, cycling over a seeded order of the
    (split, class)'s images."""
    rng = random.Random(seed)
    image_of = [None] * len(recordings)
    for split in (0, 1):
        for digit in range(10):
            recs = [i for i, r in enumerate(recordings) if r[0] == digit and recording_split(r) == split]
            if not recs:
                continue
            images = [int(j) for j in np.nonzero((image_labels == digit) & (image_split == split))[0]]
            if not images:
                raise DataError("no %s image of class %d in the handwritten folder" % (SPLIT_NAMES[split], digit))
            rng.shuffle(images)
            for k, i in enumerate(recs):
                image_of[i] = images[k % len(images)]
    return image_of


def recording_split(recording):
    return 1 if recording[2] in TEST_INDICES else 0


# ----------------------------------------------------------------------------- output


def write_rows(path, header, rows):
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        for row in rows:
            f.write(row + "\n")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fsdd_commit(fsdd):
    """The FSDD repository commit that the input folder's SOURCE.txt or SOURCE.md names, or None."""
    for name in ("SOURCE.txt", "SOURCE.md"):
        path = os.path.join(fsdd, name)
        if os.path.isfile(path):
            with open(path) as f:
                m = re.search(r"\b[0-9a-f]{40}\b", f.read())
            if m:
                return m.group(0)
    return None


def flags_text(args):
    """The flags that shape the output, as a command line fragment."""
    flags = "--seed %d --frames %d --mels %d" % (args.seed, args.frames, args.mels)
    if args.image_energy < 1.0:
        flags += " --image-energy %g" % args.image_energy
    if args.audio_snr is not None:
        flags += " --audio-snr %g --noise %s" % (args.audio_snr, args.noise)
    return flags + (" --same-tokens" if args.same_tokens else "")


def source_md(args, s_audio, s_image, counts, commit, checksums, components):
    lines = [
        "# AV-digits: spoken and handwritten digits, paired",
        "",
        "Written by `examples/datasets/avdigits.py` (its docstring documents the method) with",
        "`%s`%s." % (flags_text(args), " (the `--hard` preset)" if args.hard else ""),
        "",
        "Degradation: %s." % degradation_text(args, components),
        "",
        "Each sample pairs one FSDD recording with one handwritten image of the same digit from the same",
        "split (pairing.csv); the test split shares no recording and no image with train.",
        "",
        "| file | content |",
        "|---|---|",
        "| `labels.csv` | the digit 0..9 |",
        "| `view0_audio.csv` | `#tokens=%d`: %d log-mel frames x %d bands (STFT %d / hop %d samples at 8 kHz, "
        "periodic Hann, HTK mel 0-4000 Hz, ln with floor 1e-6)%s |" % (
            s_audio, s_audio, args.mels, FRAME, HOP,
            "" if args.audio_snr is None else "; %s noise added at %g dB SNR before the STFT" % (args.noise, args.audio_snr)),
        "| `view1_image.csv` | `#tokens=%d`: the 16 pixel rows of 15 (%s)%s |" % (
            s_image, "integers 0..6" if args.image_energy >= 1.0 else
            "PCA reconstruction from %d components fitted on the train images, 2 decimals" % components,
            "" if s_image == IMAGE_ROWS else " centred among %d background rows (0)" % (s_image - IMAGE_ROWS)),
        "| `split.csv` | 0 train (FSDD recordings 5-49), 1 test (recordings 0-4) |",
        "| `pairing.csv` | per sample: split, label, recording file, image row (0-based) of handwritten/view0_pix.csv |",
        "",
        "Samples per class (train / test): " + ", ".join(
            "%d: %d / %d" % (c, counts[0][c], counts[1][c]) for c in range(10)),
        "",
        "## Origins and licences",
        "",
        "- **Audio**: the Free Spoken Digit Dataset (Z. Jackson et al., github.com/Jakobovski/free-spoken-digit-dataset),",
        "  recorded speech of 6 speakers, licensed Creative Commons Attribution-ShareAlike 4.0 International",
        "  (CC BY-SA 4.0).",
        "- **Images**: the pix view of UCI Multiple Features (M. van Breukelen, R. P. W. Duin, D. M. J. Tax,",
        "  J. E. den Hartog, Kybernetika 34(4), 1998; UCI Machine Learning Repository data set #72), licensed",
        "  Creative Commons Attribution 4.0 International (CC BY 4.0); see data/handwritten/SOURCE.md.",
        "- **This folder** is derived from both and is therefore licensed CC BY-SA 4.0 (share-alike), with",
        "  attribution to both sources above.",
    ]
    if commit:
        lines += ["", "The recordings are those of FSDD commit %s (as the input folder's SOURCE file records)." % commit]
    else:
        lines += ["", "The input folder does not record which FSDD commit its recordings come from."]
    lines += ["", "## Checksums (sha256)", ""] + ["    %s  %s" % (h, n) for n, h in checksums]
    return "\n".join(lines) + "\n"


def prepare_out(out):
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError("%s: exists and is not a folder" % out)
    os.makedirs(out, exist_ok=True)
    foreign = sorted(n for n in os.listdir(out) if n not in OUTPUT_FILES)
    if foreign:
        raise DataError("%s: holds files this script does not write (%s); use an empty or new folder"
                        % (out, ", ".join(foreign[:3])))


def read_recordings(fsdd, recordings):
    """The waveforms of the recordings (read_wav), checked to be 8 kHz."""
    waves = []
    for digit, speaker, index, name in recordings:
        path = os.path.join(fsdd, "recordings", name)
        x, rate = read_wav(path)
        if rate != SAMPLE_RATE:
            raise DataError("%s: %d Hz, expected %d Hz" % (path, rate, SAMPLE_RATE))
        waves.append(x)
    return waves


def audio_waveform(sample, recordings, waves, n_frames, snr_db, noise, seed):
    """The waveform whose STFT gives the sample's tokens: the recording itself (snr_db None) or the
    recording in its analysis window plus white or babble noise at snr_db (noisy_waveform)."""
    if snr_db is None:
        return waves[sample]
    length = analysis_length(n_frames)
    if noise == "white":
        n = white_noise(sample, length, seed)
    else:
        n = babble_noise(sample, recordings, waves, length, seed)
    return noisy_waveform(waves[sample], n_frames, snr_db, n)


def audio_tokens(recordings, waves, args, progress=None):
    """[N, frames x mels] log-mel tokens of every sample, rounded to the 2 decimals written."""
    filterbank = mel_filterbank(args.mels)
    tokens = np.empty((len(recordings), args.frames * args.mels))
    for i in range(len(recordings)):
        x = audio_waveform(i, recordings, waves, args.frames, args.audio_snr, args.noise, args.seed)
        tokens[i] = log_mel(x, args.frames, filterbank).reshape(-1)
        if progress:
            progress(i + 1)
    return np.round(tokens, 2)


def image_pixels(pixels, image_split, energy):
    """The images [N_images, 240] as written: the integers themselves (energy 1) or their PCA
    reconstruction (pca_fit on the train images only, split_tmc 0) rounded to 2 decimals; and k."""
    if energy >= 1.0:
        return pixels, pixels.shape[1]
    mean, components = pca_fit(pixels[image_split == 0], energy)
    return np.round(pca_reconstruct(pixels, mean, components), 2), len(components)


def format_values(values, decimals):
    return ",".join("%.*f" % (decimals, v) for v in values) if decimals else ",".join(str(int(v)) for v in values)


def convert(args):
    started = time.time()
    recordings = find_recordings(args.fsdd)
    pixels, image_labels, image_split = load_handwritten(args.handwritten)
    image_of = pair_images(recordings, image_labels, image_split, args.seed)
    mel_filterbank(args.mels)  # refuse a bad --mels before the conversion
    prepare_out(args.out)

    n = len(recordings)
    waves = read_recordings(args.fsdd, recordings)
    progress_every = max(1, n // 10)

    def progress(done):
        if not args.quiet and (done % progress_every == 0 or done == n):
            print("audio: %d/%d recordings (%.1f s)" % (done, n, time.time() - started), flush=True)

    audio = audio_tokens(recordings, waves, args, progress)
    audio_rows = [format_values(row, 2) for row in audio]

    images, components = image_pixels(pixels, image_split, args.image_energy)
    decimals = 0 if args.image_energy >= 1.0 else 2
    s_image = args.frames if args.same_tokens else IMAGE_ROWS
    top = (s_image - IMAGE_ROWS) // 2
    blank = ",".join(["0"] * IMAGE_COLS)
    image_rows = []
    for j in image_of:
        rows = [format_values(images[j, r * IMAGE_COLS:(r + 1) * IMAGE_COLS], decimals) for r in range(IMAGE_ROWS)]
        rows = [blank] * top + rows + [blank] * (s_image - IMAGE_ROWS - top)
        image_rows.append(",".join(rows))

    splits = [recording_split(r) for r in recordings]
    out = args.out
    write_rows(os.path.join(out, "labels.csv"), None, [str(r[0]) for r in recordings])
    write_rows(os.path.join(out, "view0_audio.csv"), "#tokens=%d" % args.frames, audio_rows)
    write_rows(os.path.join(out, "view1_image.csv"), "#tokens=%d" % s_image, image_rows)
    write_rows(os.path.join(out, "split.csv"), None, [str(s) for s in splits])
    write_rows(os.path.join(out, "pairing.csv"), "sample,split,label,recording,image_row",
               ["%d,%s,%d,%s,%d" % (i, SPLIT_NAMES[splits[i]], r[0], r[3], image_of[i])
                for i, r in enumerate(recordings)])
    counts = [[sum(1 for r, s in zip(recordings, splits) if r[0] == c and s == split) for c in range(10)]
              for split in (0, 1)]
    checksums = [(name, sha256(os.path.join(out, name))) for name in OUTPUT_FILES if name != "SOURCE.md"]
    with open(os.path.join(out, "SOURCE.md"), "w") as f:
        f.write(source_md(args, args.frames, s_image, counts, fsdd_commit(args.fsdd), checksums, components))
    if not args.quiet:
        print("wrote %s: %d samples (%d train, %d test); audio S=%d F=%d, image S=%d F=%d; %s; %.1f s"
              % (out, n, splits.count(0), splits.count(1), args.frames, args.mels, s_image, IMAGE_COLS,
                 degradation_text(args, components), time.time() - started), flush=True)


def degradation_text(args, components):
    image = ("image PCA energy %g (%d of %d components)" % (args.image_energy, components, IMAGE_ROWS * IMAGE_COLS)
             if args.image_energy < 1.0 else "image clean")
    audio = ("audio %s noise at %g dB SNR" % (args.noise, args.audio_snr) if args.audio_snr is not None
             else "audio clean")
    return image + ", " + audio


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Build AV-digits (spoken FSDD digit + handwritten digit of the same class) as a "
                    "confsmoe-train dataset folder. Audio tokens: log-mel frames; image tokens: pixel rows. "
                    "The views differ in S (confsmoe-train runs them as they are); --same-tokens writes both "
                    "with S = --frames for consumers that need one S. --hard degrades both modalities "
                    "as AV-MNIST does (image PCA energy, babble noise). Details: the module docstring.",
        epilog="Example: /usr/bin/python3 examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out build/avdigits")
    p.add_argument("--fsdd", required=True, help="FSDD folder holding recordings/{digit}_{speaker}_{index}.wav")
    p.add_argument("--handwritten", default=os.path.join(ROOT, "data", "handwritten"),
                   help="handwritten folder (view0_pix.csv, labels.csv, split_tmc.csv); default: the repository's")
    p.add_argument("--out", required=True, help="output folder (created; only this script's files may be in it)")
    p.add_argument("--seed", type=int, default=1, help="seed of the image pairing and of the noise (default 1)")
    p.add_argument("--frames", type=int, default=50, help="S_audio: log-mel frames per recording (default 50)")
    p.add_argument("--mels", type=int, default=40, help="F_audio: mel bands (default 40)")
    p.add_argument("--same-tokens", action="store_true",
                   help="write the image view with S = --frames too (its 16 rows centred among background rows), "
                        "for consumers that need one S for all views")
    p.add_argument("--image-energy", type=float, metavar="E",
                   help="keep a share E (0 < E <= 1) of the image variance: PCA fitted on the train images, "
                        "the fewest leading components holding E, reconstruction written with 2 decimals "
                        "(default 1: the integer pixels, no PCA)")
    p.add_argument("--audio-snr", type=float, metavar="DB",
                   help="add noise to each waveform before the STFT at this signal-to-noise ratio in dB, over "
                        "the recording's own samples (default: no noise)")
    p.add_argument("--noise", choices=["babble", "white"], default="babble",
                   help="the noise of --audio-snr: babble of %d other-speaker recordings of the same split "
                        "(default) or white Gaussian" % BABBLE_TALKERS)
    p.add_argument("--hard", action="store_true",
                   help="the hard preset (AV-MNIST-like, each modality alone weak): --image-energy %g "
                        "--audio-snr %g --noise babble, chosen on the floor's validation accuracy"
                        % (HARD_IMAGE_ENERGY, HARD_AUDIO_SNR))
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    if args.hard:
        if args.image_energy is not None or args.audio_snr is not None or args.noise != "babble":
            p.error("--hard sets --image-energy, --audio-snr and --noise; give either --hard or those")
        args.image_energy, args.audio_snr = HARD_IMAGE_ENERGY, HARD_AUDIO_SNR
    if args.image_energy is None:
        args.image_energy = 1.0
    if not 0.0 < args.image_energy <= 1.0:
        p.error("--image-energy must be in (0, 1]")
    if args.audio_snr is not None and not math.isfinite(args.audio_snr):
        p.error("--audio-snr must be a finite number of dB")
    if args.frames < 1:
        p.error("--frames must be >= 1")
    if args.mels < 1:
        p.error("--mels must be >= 1")
    if args.same_tokens and args.frames < IMAGE_ROWS:
        p.error("--same-tokens pads the %d image rows to --frames, which must then be >= %d" % (IMAGE_ROWS, IMAGE_ROWS))
    try:
        convert(args)
    except DataError as e:
        print("avdigits: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
