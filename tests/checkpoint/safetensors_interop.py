"""Checkpoints against the reference `safetensors` package (from PyPI).

C writes, Python reads: names, shapes, dtypes and values of every parameter and of the
optimizer state. Python writes, C reads: parameters (and optimizer state) that C loads
bit for bit, and files that C must reject. The C side is tests/checkpoint/ckpt_tool.c,
whose path is in CKPT_TOOL. Run through run.sh, with the build's venv Python.
"""
import os
import subprocess
import tempfile
import unittest

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

TOOL = os.environ["CKPT_TOOL"]


def run_tool(*args, expect_ok=True):
    proc = subprocess.run([TOOL, *args], capture_output=True, text=True, timeout=120)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"ckpt_tool {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def read_dump(path):
    """name -> float32 array, in the model's order, from a ckpt_tool dump."""
    params = {}
    with open(path) as f:
        for line in f:
            name, dims, values = line.rstrip("\n").split("\t")
            shape = tuple(int(d) for d in dims.split(","))
            flat = [float.fromhex(v) for v in values.split(" ")] if values else []
            params[name] = np.array(flat, dtype=np.float32).reshape(shape)
    return params


def bits(a):
    """The raw bytes of an array, so that NaN payloads and -0.0 compare exactly."""
    return np.ascontiguousarray(a).tobytes()


class Interop(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.ckpt = os.path.join(cls.tmp.name, "c_written.safetensors")
        cls.dump = os.path.join(cls.tmp.name, "c_written.txt")
        run_tool("save", cls.ckpt, cls.dump)
        cls.params = read_dump(cls.dump)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.tmp.name, name)

    # ---------------------------------------------------------------- C writes, Python reads

    def test_c_checkpoint_reads_in_python(self):
        tensors = load_file(self.ckpt)
        expected_names = set(self.params)
        for name in self.params:
            expected_names |= {f"optim.{name}.m", f"optim.{name}.v", f"optim.{name}.step"}
        self.assertEqual(set(tensors), expected_names)
        for name, want in self.params.items():
            got = tensors[name]
            self.assertEqual(got.dtype, np.float32, name)
            self.assertEqual(got.shape, want.shape, name)
            self.assertEqual(bits(got), bits(want), name)
            for moment in ("m", "v"):
                state = tensors[f"optim.{name}.{moment}"]
                self.assertEqual(state.dtype, np.float32)
                self.assertEqual(state.shape, want.shape)
                self.assertTrue(np.all(np.isfinite(state)))
            self.assertTrue(np.all(tensors[f"optim.{name}.v"] >= 0))
            step = tensors[f"optim.{name}.step"]
            self.assertEqual(step.dtype, np.int64)
            self.assertEqual(step.shape, (1,))
            self.assertEqual(int(step[0]), 2)
        # Training moved the state: some moments are not zero.
        self.assertTrue(any(np.any(tensors[f"optim.{n}.m"] != 0) for n in self.params))

    def test_c_metadata(self):
        with safe_open(self.ckpt, framework="np") as f:
            meta = f.metadata()
            self.assertEqual(set(f.keys()), set(load_file(self.ckpt)))
        self.assertEqual(meta["format"], "confsmoe")
        self.assertRegex(meta["version"], r"^\d+\.\d+\.\d+$")
        self.assertEqual(meta["optim.kind"], "adam")
        self.assertAlmostEqual(float(meta["optim.lr"]), 1e-2, places=6)

    def test_c_header_is_aligned(self):
        with open(self.ckpt, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n)
        self.assertEqual(n % 8, 0)
        self.assertTrue(header.startswith(b"{"))

    # ---------------------------------------------------------------- Python writes, C reads

    def modified_params(self):
        out = {}
        for i, (name, p) in enumerate(self.params.items()):
            out[name] = (np.arange(p.size, dtype=np.float32).reshape(p.shape) * np.float32(0.001)
                         + np.float32(i) - np.float32(30))
        return out

    def test_python_file_loads_in_c(self):
        tensors = self.modified_params()
        src = self.path("py_params.safetensors")
        save_file(tensors, src, metadata={"format": "np"})
        out = self.path("py_params.txt")
        run_tool("load", src, out)
        loaded = read_dump(out)
        self.assertEqual(list(loaded), list(self.params))
        for name, want in tensors.items():
            self.assertEqual(loaded[name].shape, want.shape, name)
            self.assertEqual(bits(loaded[name]), bits(want), name)

    def test_python_file_without_metadata_loads_in_c(self):
        src = self.path("py_nometa.safetensors")
        save_file(self.modified_params(), src)
        run_tool("load", src, self.path("py_nometa.txt"))

    def test_python_optimizer_state_round_trips(self):
        rng = np.random.default_rng(3)
        tensors = {}
        for name, p in self.modified_params().items():
            tensors[name] = p
            tensors[f"optim.{name}.m"] = rng.standard_normal(p.shape).astype(np.float32)
            tensors[f"optim.{name}.v"] = rng.random(p.shape).astype(np.float32)
            tensors[f"optim.{name}.step"] = np.array([rng.integers(1, 1000)], dtype=np.int64)
        # Special values survive bit for bit.
        special = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38, -1.5, 0.0], dtype=np.float32)
        name = next(n for n, p in self.params.items() if p.size >= special.size)
        flat = tensors[name].reshape(-1).copy()
        flat[: special.size] = special
        tensors[name] = flat.reshape(self.params[name].shape)
        src, dst = self.path("py_full.safetensors"), self.path("c_resaved.safetensors")
        save_file(tensors, src, metadata={"format": "confsmoe"})
        run_tool("roundtrip", src, dst)
        back = load_file(dst)
        self.assertEqual(set(back), set(tensors))
        for key, want in tensors.items():
            self.assertEqual(back[key].dtype, want.dtype, key)
            self.assertEqual(back[key].shape, want.shape, key)
            self.assertEqual(bits(back[key]), bits(want), key)

    # ---------------------------------------------------------------- files C must reject

    def expect_rejected(self, tensors, *mentions, command="load"):
        src = self.path("py_bad.safetensors")
        save_file(tensors, src)
        proc = run_tool(command, src, self.path("unused.txt"), expect_ok=False)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn("bad file format", proc.stderr)
        for m in mentions:
            self.assertIn(m, proc.stderr)

    def test_c_rejects_wrong_dtype(self):
        tensors = self.modified_params()
        tensors["head.b"] = tensors["head.b"].astype(np.float64)
        self.expect_rejected(tensors, '"head.b" is F64, expected F32')

    def test_c_rejects_wrong_shape(self):
        tensors = self.modified_params()
        tensors["enc.0.w"] = tensors["enc.0.w"].reshape(-1)
        self.expect_rejected(tensors, '"enc.0.w" has shape [40] in the file', "[8, 5]")

    def test_c_rejects_missing_and_unknown(self):
        tensors = self.modified_params()
        del tensors["ln_out.bias"]
        self.expect_rejected(tensors, '"ln_out.bias" is missing')
        tensors = self.modified_params()
        tensors["expert.4.w1"] = np.zeros((8, 8), dtype=np.float32)
        self.expect_rejected(tensors, '"expert.4.w1" is not a parameter of this model')

    def test_c_rejects_missing_optimizer_state(self):
        self.expect_rejected(self.modified_params(), '"optim.enc.0.w.m" is missing', command="roundtrip")


if __name__ == "__main__":
    unittest.main()
