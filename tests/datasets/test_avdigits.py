#!/usr/bin/python3
"""Tests of examples/datasets/avdigits.py (the AV-digits dataset folder), about 10 s:

    /usr/bin/python3 tests/datasets/test_avdigits.py --trainer build/examples/train/confsmoe-train -v

- the signal processing against independent expectations: a WAV written with `wave` reads back
  exactly; the periodic Hann window; a sinusoid on an FFT bin has the analytic power A^2 N^2 / 16 in
  that bin and nothing beyond its neighbours; known points of the HTK mel scale; the triangular
  filters peak at 1 at their centres and sum to 1 between the first and last centre; a sinusoid at a
  band's centre frequency has its largest mel energy in that band;
- the conversion of tests/fixtures/fsdd-mini (30 real FSDD recordings) + data/handwritten: layout,
  `#tokens=` lines, labels against both sources, same class per pair, disjoint splits, token-major
  audio rows (silence frames exactly where the recording has ended), byte-identical reruns, errors;
- the degradations: the PCA reconstruction holds the requested share of the train images' variance
  (checked against an SVD, to the component granularity), E = 1 is the identity, the fit uses the
  train images only; the noisy waveform has the requested SNR (signal and noise measured apart), the
  written audio is its log-mel, babble draws only other speakers of the same split; --hard is
  deterministic for a seed;
- the --same-tokens folder trains for one epoch with confsmoe-train (--trainer, required).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(ROOT, "examples", "datasets", "avdigits.py")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "fsdd-mini")
HANDWRITTEN = os.path.join(ROOT, "data", "handwritten")
sys.path.insert(0, os.path.dirname(SCRIPT))
import avdigits  # noqa: E402

TRAINER = None  # set from --trainer in __main__


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True, timeout=300)


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def read_view(path):
    """(tokens from the '#tokens=S' line, values [N, S*F])."""
    lines = read_lines(path)
    if not lines[0].startswith("#tokens="):
        raise AssertionError("%s: first line %r" % (path, lines[0]))
    return int(lines[0][len("#tokens="):]), np.array([[float(v) for v in line.split(",")] for line in lines[1:]])


def read_pairing(path):
    lines = read_lines(path)
    assert lines[0] == "sample,split,label,recording,image_row", lines[0]
    rows = [line.split(",") for line in lines[1:]]
    return [dict(sample=int(r[0]), split=r[1], label=int(r[2]), recording=r[3], image_row=int(r[4])) for r in rows]


class TestSignal(unittest.TestCase):
    def test_wav_reads_back_exactly(self):
        samples = np.array([0, 1, -1, 32767, -32768, 12345, -2222] * 50, np.int16)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.wav")
            with wave.open(path, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(8000)
                w.writeframes(samples.astype("<i2").tobytes())
            x, rate = avdigits.read_wav(path)
        self.assertEqual(rate, 8000)
        self.assertTrue(np.array_equal(x * 32768.0, samples.astype(np.float64)))

    def test_stereo_wav_is_refused_with_its_name(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "stereo.wav")
            with wave.open(path, "wb") as w:
                w.setnchannels(2)
                w.setsampwidth(2)
                w.setframerate(8000)
                w.writeframes(b"\0" * 400)
            with self.assertRaisesRegex(avdigits.DataError, "stereo.wav: 2 channel"):
                avdigits.read_wav(path)

    def test_periodic_hann(self):
        w = avdigits.hann(256)
        self.assertEqual(w[0], 0.0)
        self.assertAlmostEqual(w[128], 1.0, places=15)
        self.assertAlmostEqual(w[64], 0.5, places=15)
        self.assertTrue(np.allclose(w[1:], w[1:][::-1]))  # periodic: symmetric about n / 2

    def test_sinusoid_on_a_bin(self):
        # A cos(2 pi k n / N + phi) under a periodic Hann window of length N: its DFT at bin k has
        # magnitude A/2 * sum(w) = A N / 4, at bins k +- 1 A N / 8, and 0 elsewhere.
        N, k, A = avdigits.FRAME, 20, 0.3
        n = np.arange(4000)
        x = A * np.cos(2 * np.pi * k * n / N + 0.7)
        power = avdigits.stft_power(x, 10)
        self.assertEqual(power.shape, (10, N // 2 + 1))
        for frame in power:
            self.assertEqual(int(np.argmax(frame)), k)
            self.assertAlmostEqual(frame[k] / (A * N / 4) ** 2, 1.0, places=9)
            self.assertAlmostEqual(frame[k + 1] / (A * N / 8) ** 2, 1.0, places=9)
            far = np.delete(frame, [k - 1, k, k + 1])
            self.assertLess(far.max(), 1e-18 * frame[k])

    def test_frames_pad_and_trim(self):
        hop, frame = avdigits.HOP, avdigits.FRAME
        x = np.ones(hop * 3)  # frames 0-2 start inside the signal, frame 3 and later do not
        power = avdigits.stft_power(x, 6)
        self.assertTrue(np.all(power[:3].sum(1) > 0))
        self.assertTrue(np.all(power[3:] == 0))
        long = np.random.default_rng(0).standard_normal(frame + 100 * hop)
        self.assertEqual(avdigits.stft_power(long, 5).shape[0], 5)
        self.assertTrue(np.array_equal(avdigits.stft_power(long, 5), avdigits.stft_power(long[:frame + 4 * hop], 5)))

    def test_mel_scale_known_points(self):
        # HTK Book (Young et al.), eq. 7.8 / O'Shaughnessy 1987: Mel(f) = 2595 log10(1 + f/700);
        # by construction of the mel scale (Stevens, Volkmann, Newman 1937) 1000 Hz is about 1000 mel;
        # 4000 Hz, FSDD's Nyquist frequency, is 2146.06 mel in this formula.
        self.assertAlmostEqual(float(avdigits.hz_to_mel(0.0)), 0.0, places=12)
        self.assertAlmostEqual(float(avdigits.hz_to_mel(1000.0)), 1000.0, delta=0.05)
        self.assertAlmostEqual(float(avdigits.hz_to_mel(4000.0)), 2146.06, delta=0.01)
        f = np.array([0.0, 50.0, 440.0, 1000.0, 3999.0])
        self.assertTrue(np.allclose(avdigits.mel_to_hz(avdigits.hz_to_mel(f)), f, rtol=0, atol=1e-9))

    def test_filters_peak_at_their_centres(self):
        n_mels = 40
        points = avdigits.mel_centres_hz(n_mels, 0.0, 4000.0)
        self.assertAlmostEqual(points[0], 0.0, places=9)
        self.assertAlmostEqual(points[-1], 4000.0, places=9)
        at_centres = avdigits.mel_filters_at(points[1:-1], n_mels, 0.0, 4000.0)
        self.assertTrue(np.allclose(at_centres, np.eye(n_mels), rtol=0, atol=1e-12))
        at_edges = avdigits.mel_filters_at(points[[0, -1]], n_mels, 0.0, 4000.0)
        self.assertTrue(np.all(np.abs(at_edges) < 1e-12))
        grid = np.linspace(points[1], points[-2], 1001)
        sums = avdigits.mel_filters_at(grid, n_mels, 0.0, 4000.0).sum(0)
        self.assertTrue(np.allclose(sums, 1.0, rtol=0, atol=1e-12))  # triangles in mel: a partition of unity

    def test_filterbank_on_fft_bins(self):
        fb = avdigits.mel_filterbank(40)
        self.assertEqual(fb.shape, (40, avdigits.FRAME // 2 + 1))
        self.assertTrue(np.all(fb.sum(1) > 0))
        self.assertLessEqual(fb.max(), 1.0)
        self.assertTrue(np.all(fb[:, 0] == 0) and np.all(fb[:, -1] == 0))  # 0 Hz and 4000 Hz are outer edges
        with self.assertRaisesRegex(avdigits.DataError, "without an FFT bin"):
            avdigits.mel_filterbank(200)

    def test_sinusoid_lands_in_its_band(self):
        n_mels = 40
        fb = avdigits.mel_filterbank(n_mels)
        points = avdigits.mel_centres_hz(n_mels, 0.0, 4000.0)
        bin_hz = avdigits.SAMPLE_RATE / avdigits.FRAME
        n = np.arange(avdigits.FRAME + 9 * avdigits.HOP)
        checked = 0
        for m in range(n_mels):
            # The Hann main lobe spreads a tone over +-2 bins: check the bands whose rising and
            # falling halves are each wider than that.
            if min(points[m + 1] - points[m], points[m + 2] - points[m + 1]) < 2 * bin_hz:
                continue
            x = 0.5 * np.sin(2 * np.pi * points[m + 1] * n / avdigits.SAMPLE_RATE)
            tokens = avdigits.log_mel(x, 10, fb)
            self.assertEqual(set(np.argmax(tokens, 1).tolist()), {m}, "band %d (%.1f Hz)" % (m, points[m + 1]))
            checked += 1
        self.assertGreaterEqual(checked, 20)


class TestConversion(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="avdigits-test-")
        cls.out = os.path.join(cls.tmp, "a")
        cls.again = os.path.join(cls.tmp, "b")
        cls.same = os.path.join(cls.tmp, "same")
        cls.other_seed = os.path.join(cls.tmp, "seed2")
        cls.runs = [run_script("--fsdd", FIXTURE, "--handwritten", HANDWRITTEN, "--out", out, *extra)
                    for out, extra in [(cls.out, []), (cls.again, []), (cls.same, ["--same-tokens"]),
                                       (cls.other_seed, ["--seed", "2"])]]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def setUp(self):
        for p in self.runs:
            self.assertEqual(p.returncode, 0, p.stderr)

    def recordings(self):
        return sorted(os.listdir(os.path.join(FIXTURE, "recordings")))

    def test_progress_lines(self):
        self.assertIn("audio: 30/30 recordings", self.runs[0].stdout)

    def test_layout_and_shapes(self):
        self.assertEqual(sorted(os.listdir(self.out)), sorted(avdigits.OUTPUT_FILES))
        s_audio, audio = read_view(os.path.join(self.out, "view0_audio.csv"))
        s_image, image = read_view(os.path.join(self.out, "view1_image.csv"))
        self.assertEqual((s_audio, audio.shape), (50, (30, 50 * 40)))
        self.assertEqual((s_image, image.shape), (16, (30, 16 * 15)))
        self.assertEqual(len(read_lines(os.path.join(self.out, "labels.csv"))), 30)
        self.assertEqual(len(read_lines(os.path.join(self.out, "split.csv"))), 30)

    def test_labels_pairs_and_splits_agree_with_both_sources(self):
        labels = [int(v) for v in read_lines(os.path.join(self.out, "labels.csv"))]
        split = [int(v) for v in read_lines(os.path.join(self.out, "split.csv"))]
        pairing = read_pairing(os.path.join(self.out, "pairing.csv"))
        hw_labels = [int(v) for v in read_lines(os.path.join(HANDWRITTEN, "labels.csv"))]
        hw_split = [int(v) for v in read_lines(os.path.join(HANDWRITTEN, "split_tmc.csv"))]
        hw_pix = np.loadtxt(os.path.join(HANDWRITTEN, "view0_pix.csv"), delimiter=",")
        _, image = read_view(os.path.join(self.out, "view1_image.csv"))
        self.assertEqual(sorted(p["recording"] for p in pairing), self.recordings())  # each recording once
        for i, p in enumerate(pairing):
            digit, _, index = p["recording"][:-4].split("_")
            self.assertEqual(p["sample"], i)
            self.assertEqual(labels[i], int(digit))
            self.assertEqual(p["label"], int(digit))
            self.assertEqual(hw_labels[p["image_row"]], int(digit), p)  # same class in both modalities
            self.assertEqual(split[i], 1 if int(index) < 5 else 0)  # FSDD: indices 0-4 are test
            self.assertEqual(p["split"], ["train", "test"][split[i]])
            self.assertEqual(hw_split[p["image_row"]], split[i], p)  # the image comes from the same split
            self.assertTrue(np.array_equal(image[i], hw_pix[p["image_row"]]))
        self.assertEqual(split.count(0), 20)
        self.assertEqual(split.count(1), 10)
        for key in ("recording", "image_row"):
            train = {p[key] for p in pairing if p["split"] == "train"}
            test = {p[key] for p in pairing if p["split"] == "test"}
            self.assertFalse(train & test, key)
        # One recording per class and split here: every image is distinct.
        self.assertEqual(len({p["image_row"] for p in pairing}), 30)

    def test_audio_rows_are_token_major_with_silence_after_the_recording(self):
        s_audio, audio = read_view(os.path.join(self.out, "view0_audio.csv"))
        pairing = read_pairing(os.path.join(self.out, "pairing.csv"))
        floor = round(math.log(avdigits.LOG_FLOOR), 2)
        for p, row in zip(pairing, audio):
            with wave.open(os.path.join(FIXTURE, "recordings", p["recording"])) as w:
                n_samples = w.getnframes()
            tokens = row.reshape(s_audio, 40)  # token t = the 40 bands of frame t
            for t in range(s_audio):
                start = t * avdigits.HOP
                if start >= n_samples:  # the frame starts after the recording's end: silence
                    self.assertTrue(np.all(tokens[t] == floor), (p["recording"], t))
                elif start + avdigits.FRAME <= n_samples:  # the frame lies inside the recording
                    self.assertFalse(np.all(tokens[t] == floor), (p["recording"], t))

    def test_reruns_are_byte_identical(self):
        for name in avdigits.OUTPUT_FILES:
            with open(os.path.join(self.out, name), "rb") as a, open(os.path.join(self.again, name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

    def test_the_seed_changes_the_images_only(self):
        a = read_pairing(os.path.join(self.out, "pairing.csv"))
        b = read_pairing(os.path.join(self.other_seed, "pairing.csv"))
        self.assertEqual([p["recording"] for p in a], [p["recording"] for p in b])
        self.assertNotEqual([p["image_row"] for p in a], [p["image_row"] for p in b])
        with open(os.path.join(self.out, "view0_audio.csv"), "rb") as f1, \
                open(os.path.join(self.other_seed, "view0_audio.csv"), "rb") as f2:
            self.assertEqual(f1.read(), f2.read())

    def test_same_tokens_centres_the_image_rows(self):
        s_image, image = read_view(os.path.join(self.same, "view1_image.csv"))
        _, rows16 = read_view(os.path.join(self.out, "view1_image.csv"))
        self.assertEqual(s_image, 50)
        image = image.reshape(30, 50, 15)
        self.assertTrue(np.all(image[:, :17] == 0) and np.all(image[:, 33:] == 0))
        self.assertTrue(np.array_equal(image[:, 17:33].reshape(30, -1), rows16))

    def test_source_md_names_origins_and_licences(self):
        with open(os.path.join(self.out, "SOURCE.md")) as f:
            text = f.read()
        for needle in ("CC BY-SA 4.0", "CC BY 4.0", "26eb9aaf76e81b692f806f9140c2d2777410d7a1", "view0_audio.csv"):
            self.assertIn(needle, text)

    def test_errors_name_the_file(self):
        with tempfile.TemporaryDirectory() as tmp:
            p = run_script("--fsdd", os.path.join(tmp, "nowhere"), "--out", os.path.join(tmp, "o"))
            self.assertEqual(p.returncode, 2)
            self.assertIn(os.path.join(tmp, "nowhere", "recordings"), p.stderr)
            bad = os.path.join(tmp, "fsdd")
            shutil.copytree(FIXTURE, bad)
            with open(os.path.join(bad, "recordings", "3_theo_7.wav"), "wb") as f:
                f.write(b"RIFF not really a wave file")
            p = run_script("--fsdd", bad, "--out", os.path.join(tmp, "o"))
            self.assertEqual(p.returncode, 2)
            self.assertIn("3_theo_7.wav: not a readable WAV file", p.stderr)
            os.makedirs(os.path.join(tmp, "busy"))
            open(os.path.join(tmp, "busy", "notes.txt"), "w").close()
            p = run_script("--fsdd", FIXTURE, "--out", os.path.join(tmp, "busy"))
            self.assertEqual(p.returncode, 2)
            self.assertIn("notes.txt", p.stderr)


class TestDegradation(unittest.TestCase):
    """--image-energy (PCA on the train images) and --audio-snr (noise before the STFT), and --hard."""

    @classmethod
    def setUpClass(cls):
        cls.pixels, cls.image_labels, cls.image_split = avdigits.load_handwritten(HANDWRITTEN)
        cls.recordings = avdigits.find_recordings(FIXTURE)
        cls.waves = avdigits.read_recordings(FIXTURE, cls.recordings)
        cls.tmp = tempfile.mkdtemp(prefix="avdigits-hard-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def convert(self, name, *extra, handwritten=HANDWRITTEN):
        out = os.path.join(self.tmp, name)
        p = run_script("--fsdd", FIXTURE, "--handwritten", handwritten, "--out", out, "--quiet", *extra)
        self.assertEqual(p.returncode, 0, p.stderr)
        return out

    def test_pca_keeps_the_requested_energy_of_the_train_images(self):
        train = self.pixels[self.image_split == 0].astype(np.float64)
        centred = train - train.mean(0)
        # Independently of pca_fit (eigh of the covariance): the SVD of the centred train images.
        _, singular, right = np.linalg.svd(centred, full_matrices=False)
        share = np.cumsum(singular ** 2) / np.sum(singular ** 2)
        for energy in (0.25, 0.5, 0.9):
            mean, components = avdigits.pca_fit(train, energy)
            k = len(components)
            self.assertGreaterEqual(share[k - 1], energy)  # enough components ...
            if k > 1:
                self.assertLess(share[k - 2], energy)  # ... and the fewest
            recon = avdigits.pca_reconstruct(train, mean, components)
            kept = np.sum((recon - train.mean(0)) ** 2) / np.sum(centred ** 2)
            self.assertAlmostEqual(kept, share[k - 1], places=9)  # the reconstruction holds that share
            self.assertTrue(kept >= energy and kept - energy < singular[k - 1] ** 2 / np.sum(singular ** 2))
            projection = train.mean(0) + centred @ right[:k].T @ right[:k]
            self.assertTrue(np.allclose(recon, projection, rtol=0, atol=1e-9))
        self.assertEqual(len(avdigits.pca_fit(train, 0.25)[1]), 2)  # the handwritten pix view: 17.5%, 28.1%

    def test_energy_one_is_the_identity(self):
        plain = self.convert("plain")
        full = self.convert("e1", "--image-energy", "1")
        with open(os.path.join(plain, "view1_image.csv"), "rb") as a, open(os.path.join(full, "view1_image.csv"), "rb") as b:
            self.assertEqual(a.read(), b.read())
        train = self.pixels[self.image_split == 0].astype(np.float64)
        mean, components = avdigits.pca_fit(train, 1.0)
        self.assertTrue(np.allclose(avdigits.pca_reconstruct(self.pixels, mean, components), self.pixels, atol=1e-9))

    def test_written_images_are_the_reconstruction(self):
        out = self.convert("e25", "--image-energy", "0.25")
        _, image = read_view(os.path.join(out, "view1_image.csv"))
        pairing = read_pairing(os.path.join(out, "pairing.csv"))
        train = self.pixels[self.image_split == 0].astype(np.float64)
        mean, components = avdigits.pca_fit(train, 0.25)
        expected = avdigits.pca_reconstruct(self.pixels[[p["image_row"] for p in pairing]], mean, components)
        self.assertLessEqual(np.abs(image - expected).max(), 0.005 + 1e-9)  # 2 decimals
        self.assertGreater(np.abs(image - self.pixels[[p["image_row"] for p in pairing]]).max(), 1.0)

    def test_the_pca_is_fitted_on_train_images_only(self):
        changed = os.path.join(self.tmp, "handwritten-changed")
        shutil.copytree(HANDWRITTEN, changed)
        pixels = self.pixels.copy()
        pixels[self.image_split == 1] = 6 - pixels[self.image_split == 1]  # every test image inverted
        np.savetxt(os.path.join(changed, "view0_pix.csv"), pixels, fmt="%d", delimiter=",")
        a = self.convert("fit-a", "--image-energy", "0.5")
        b = self.convert("fit-b", "--image-energy", "0.5", handwritten=changed)
        split = np.array([int(v) for v in read_lines(os.path.join(a, "split.csv"))])
        _, image_a = read_view(os.path.join(a, "view1_image.csv"))
        _, image_b = read_view(os.path.join(b, "view1_image.csv"))
        self.assertTrue(np.array_equal(image_a[split == 0], image_b[split == 0]))
        self.assertFalse(np.array_equal(image_a[split == 1], image_b[split == 1]))  # the change reached the output

    def measured_snr(self, sample, snr, noise):
        noisy = avdigits.audio_waveform(sample, self.recordings, self.waves, 50, snr, noise, 1)
        x = self.waves[sample]
        own = min(len(x), len(noisy))
        signal = np.zeros(len(noisy))
        signal[:own] = x[:own]
        added = noisy - signal
        if own < len(noisy):
            self.assertGreater(np.mean(added[own:] ** 2), 0.0)  # noise over the padding too: no silent tail
        return 10 * np.log10(np.sum(signal[:own] ** 2) / np.sum(added[:own] ** 2))

    def test_snr_of_the_noisy_waveform(self):
        for noise in ("babble", "white"):
            for snr in (10.0, 0.0, -5.0):
                for sample in (0, 7, 29):
                    self.assertAlmostEqual(self.measured_snr(sample, snr, noise), snr, places=9, msg=(noise, sample))

    def test_written_audio_is_the_log_mel_of_the_noisy_waveform(self):
        out = self.convert("snr0", "--audio-snr", "0")
        _, audio = read_view(os.path.join(out, "view0_audio.csv"))
        fb = avdigits.mel_filterbank(40)
        for sample in (0, 13, 29):
            noisy = avdigits.audio_waveform(sample, self.recordings, self.waves, 50, 0.0, "babble", 1)
            self.assertLessEqual(np.abs(audio[sample] - avdigits.log_mel(noisy, 50, fb).reshape(-1)).max(), 0.005 + 1e-9)
        _, clean = read_view(os.path.join(self.convert("clean"), "view0_audio.csv"))
        self.assertGreater(np.abs(audio - clean).max(), 1.0)

    def test_babble_uses_other_speakers_of_the_same_split(self):
        # Recordings that babble must not use are NaN: one of them in the babble would make it NaN.
        for sample in range(len(self.recordings)):
            digit, speaker, index, _ = self.recordings[sample]
            split = avdigits.recording_split(self.recordings[sample])
            poisoned = [w if avdigits.recording_split(r) == split and r[1] != speaker else np.full(len(w), np.nan)
                        for r, w in zip(self.recordings, self.waves)]
            babble = avdigits.babble_noise(sample, self.recordings, poisoned, 5156, 1)
            self.assertTrue(np.all(np.isfinite(babble)), self.recordings[sample][3])
            self.assertGreater(np.std(babble), 0.5)

    def test_hard_is_deterministic_and_seeded(self):
        a, b = self.convert("hard-a", "--hard"), self.convert("hard-b", "--hard")
        c = self.convert("hard-seed2", "--hard", "--seed", "2")
        for name in avdigits.OUTPUT_FILES:
            with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
                self.assertEqual(fa.read(), fb.read(), name)
        with open(os.path.join(a, "view0_audio.csv"), "rb") as fa, open(os.path.join(c, "view0_audio.csv"), "rb") as fc:
            self.assertNotEqual(fa.read(), fc.read())  # the seed draws the noise
        with open(os.path.join(a, "SOURCE.md")) as f:
            text = f.read()
        self.assertIn("--image-energy %g --audio-snr %g --noise babble" % (avdigits.HARD_IMAGE_ENERGY,
                                                                          avdigits.HARD_AUDIO_SNR), text)
        self.assertIn("the `--hard` preset", text)

    def test_bad_degradation_flags(self):
        for extra, needle in [(["--image-energy", "0"], "--image-energy must be in"),
                              (["--image-energy", "1.5"], "--image-energy must be in"),
                              (["--audio-snr", "nan"], "--audio-snr must be"),
                              (["--hard", "--audio-snr", "5"], "--hard sets")]:
            p = run_script("--fsdd", FIXTURE, "--out", os.path.join(self.tmp, "bad"), *extra)
            self.assertEqual(p.returncode, 2, extra)
            self.assertIn(needle, p.stderr)


class TestTrainer(unittest.TestCase):
    def test_same_tokens_folder_trains_one_epoch(self):
        self.assertTrue(TRAINER and os.access(TRAINER, os.X_OK), "pass --trainer PATH to confsmoe-train")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "avdigits")
            p = run_script("--fsdd", FIXTURE, "--out", out, "--same-tokens", "--quiet")
            self.assertEqual(p.returncode, 0, p.stderr)
            env = dict(os.environ, BLIS_NUM_THREADS="1")
            t = subprocess.run([TRAINER, "--data", out, "--epochs", "1", "--quiet", "--missing", "0.3"],
                               capture_output=True, text=True, timeout=300, env=env)
            self.assertEqual(t.returncode, 0, t.stderr)
            self.assertIn("(10 samples", t.stdout)  # the 10 test recordings

    def test_default_folder_trains_with_per_view_tokens(self):
        """Without --same-tokens the audio and image views differ in S: the trainer runs S_m per view."""
        self.assertTrue(TRAINER and os.access(TRAINER, os.X_OK), "pass --trainer PATH to confsmoe-train")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "avdigits")
            p = run_script("--fsdd", FIXTURE, "--out", out, "--quiet")
            self.assertEqual(p.returncode, 0, p.stderr)
            tokens = []
            for name in sorted(os.listdir(out)):
                if name.startswith("view"):
                    with open(os.path.join(out, name)) as f:
                        tokens.append(int(f.readline().strip().split("=")[1]))
            self.assertEqual(len(tokens), 2)
            self.assertNotEqual(tokens[0], tokens[1])
            env = dict(os.environ, BLIS_NUM_THREADS="1")
            js = os.path.join(tmp, "run.json")
            t = subprocess.run([TRAINER, "--data", out, "--epochs", "1", "--missing", "0.3", "--json", js],
                               capture_output=True, text=True, timeout=300, env=env)
            self.assertEqual(t.returncode, 0, t.stderr)
            self.assertIn("(S per view", t.stdout)
            with open(js) as f:
                j = json.load(f)
            self.assertEqual([m["tokens"] for m in j["modalities"]], tokens)
            self.assertEqual(j["tokens"], 0)
            # Every token of every modality is routed: slots = k * sum_m S_m per test sample.
            self.assertEqual(sum(j["experts"]["slots"]), 2 * sum(tokens) * j["n_test"])


if __name__ == "__main__":
    if "--trainer" in sys.argv:
        i = sys.argv.index("--trainer")
        TRAINER = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    unittest.main()
