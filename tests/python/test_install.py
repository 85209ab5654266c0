#!/usr/bin/python3
"""The INSTALLED package: `meson install --destdir` into a temporary directory, then a fresh
/usr/bin/python3 imports confsmoe from the installed site-packages with no CONFSMOE_LIBRARY,
no LD_LIBRARY_PATH and no source tree on its path. The package must find the installed
library through the generated _paths.py (relocated into the destdir), and its __version__ must
be the library's.

Run:  CONFSMOE_BUILD_ROOT=build /usr/bin/python3 tests/python/test_install.py -v
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
import unittest

BUILD = os.environ.get("CONFSMOE_BUILD_ROOT")

CHECK = r"""
import sys, numpy as np
import confsmoe
assert "torch" not in sys.modules, "import confsmoe must not import torch"
print("version", confsmoe.__version__, confsmoe.version_number())
print("library", confsmoe.library_path)
print("package", confsmoe.__file__)
with confsmoe.Context(seed=1) as ctx:
    e = [confsmoe.Expert(ctx, 4) for _ in range(2)]
    g = confsmoe.Gate(ctx, e, k=1, combine="router_softmax")
    print("forward", g.forward(np.ones((3, 4), np.float32)).y.shape)
"""


@unittest.skipIf(not BUILD, "CONFSMOE_BUILD_ROOT (the meson build directory) is not set")
class TestInstalledTree(unittest.TestCase):
    def test_import_from_installed_tree(self):
        meson = shutil.which("meson")
        if not meson:
            self.skipTest("meson not found")
        with tempfile.TemporaryDirectory() as dest:
            subprocess.run([meson, "install", "-C", BUILD, "--destdir", dest, "--no-rebuild", "--quiet"],
                           check=True, capture_output=True)
            inits = glob.glob(os.path.join(dest, "**", "confsmoe", "__init__.py"), recursive=True)
            self.assertEqual(len(inits), 1, inits)
            pkg = os.path.dirname(inits[0])
            site = os.path.dirname(pkg)
            self.assertTrue(os.path.exists(os.path.join(pkg, "_paths.py")), "the generated _paths.py is not installed")
            self.assertTrue(os.path.exists(os.path.join(pkg, "torch_bridge.py")))
            libs = glob.glob(os.path.join(dest, "**", "libconfsmoe.so.0"), recursive=True)
            self.assertEqual(len(libs), 1, libs)
            # for the system prefixes (/usr/local by default, or /usr), the package lands in a
            # directory /usr/bin/python3 searches by default: `import confsmoe` works after install
            rel_site = "/" + os.path.relpath(site, dest)
            if rel_site.startswith(("/usr/local/", "/usr/lib/")):
                sys_path = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('\\n'.join(sys.path))"],
                                          capture_output=True, text=True, check=True).stdout.split()
                self.assertIn(rel_site, sys_path)

            env = {k: v for k, v in os.environ.items()
                   if k not in ("CONFSMOE_LIBRARY", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHOME")}
            env["PYTHONPATH"] = site
            r = subprocess.run(["/usr/bin/python3", "-c", CHECK], cwd=dest, env=env, capture_output=True,
                               text=True)
            self.assertEqual(r.returncode, 0, r.stderr)
            lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
            self.assertEqual(os.path.realpath(lines["library"]), os.path.realpath(libs[0]))
            self.assertTrue(lines["package"].startswith(dest))
            self.assertEqual(lines["forward"], "(3, 4)")
            # the version is the C library's (and the build's)
            import confsmoe  # the source-tree package of this test run, on the build's library
            self.assertEqual(lines["version"].split()[0], confsmoe.__version__)

            # the bridge imports from the installed tree too
            r = subprocess.run(["/usr/bin/python3", "-c", "import confsmoe.torch as ct; print(ct.MoELayer.__name__)"],
                               cwd=dest, env=env, capture_output=True, text=True)
            if importlib.util.find_spec("torch") is not None:
                self.assertEqual(r.stdout.strip(), "MoELayer", r.stderr)


if __name__ == "__main__":
    unittest.main()
