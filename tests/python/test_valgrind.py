#!/usr/bin/python3
"""The ownership scenarios of valgrind_ownership.py under valgrind (memcheck).

Python runs with PYTHONMALLOC=malloc so that valgrind sees every allocation. Leaks are not
errors here (--errors-for-leak-kinds=none: the interpreter keeps a lot alive at exit); every
other memcheck error fails the test, and invalid reads, writes or frees are listed with the
frame in libconfsmoe they come from. A negative control (a deliberate use-after-free through the
raw API) must be reported, which shows the harness would catch one.
"""
import os
import re
import shutil
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "valgrind_ownership.py")
VALGRIND = shutil.which("valgrind")


def run(*args):
    env = dict(os.environ, PYTHONMALLOC="malloc", BLIS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [VALGRIND, "--error-exitcode=99", "--errors-for-leak-kinds=none", "--num-callers=30",
           sys.executable, SCRIPT] + list(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)


def in_library(record):
    """True when a stack has a frame in libconfsmoe (its functions, or the .so without symbols)."""
    return any(re.search(r": (confsmoe|csm)_\w+ \(|libconfsmoe", line) for line in record)


def invalid_accesses(stderr):
    """The 'Invalid read/write/free' records of a memcheck log, each with its stack."""
    records, current = [], None
    for line in stderr.splitlines():
        body = re.sub(r"^==\d+== ?", "", line)
        if re.match(r"(Invalid (read|write|free)|Mismatched free|Use of uninitialised)", body):
            current = [body]
            records.append(current)
        elif current is not None and body.strip():
            current.append(body)
        else:
            current = None
    return records


@unittest.skipIf(VALGRIND is None, "valgrind is not installed")
class TestValgrind(unittest.TestCase):
    def test_ownership_scenarios_are_clean(self):
        r = run()
        bad = invalid_accesses(r.stderr)
        in_lib = [rec for rec in bad if in_library(rec)]
        self.assertEqual(in_lib, [], "invalid accesses in libconfsmoe:\n" + "\n\n".join("\n".join(x) for x in in_lib))
        self.assertEqual(bad, [], "invalid accesses:\n" + "\n\n".join("\n".join(x) for x in bad))
        self.assertIn("ownership scenarios: ok", r.stdout, r.stderr[-3000:])
        self.assertIn("ERROR SUMMARY: 0 errors", r.stderr, r.stderr[-3000:])
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])

    def test_negative_control_is_detected(self):
        r = run("--uaf")
        bad = invalid_accesses(r.stderr)
        self.assertTrue(any(rec[0].startswith("Invalid read") and in_library(rec) for rec in bad),
                        r.stderr[-3000:])
        self.assertEqual(r.returncode, 99)


if __name__ == "__main__":
    unittest.main()
