#!/usr/bin/env python3
"""The pip package: the wheel and the sdist that pyproject.toml (meson-python) builds, and what
`pip install` / `pip uninstall` of them do to a fresh venv of /usr/bin/python3.

tests/python/pypi_venv.sh builds both and runs this file:
    CONFSMOE_WHEEL=dist/confsmoe-0.3.0-py3-none-linux_x86_64.whl \\
    CONFSMOE_SDIST=dist/confsmoe-0.3.0.tar.gz python3 tests/python/test_pip_package.py -v

The fresh venvs see Debian's site-packages (python3-numpy 1.24, the oldest numpy the package
declares) and get confsmoe with --no-deps, so that nothing but confsmoe comes and goes.
"""
import base64
import email.parser
import glob
import hashlib
import os
import re
import subprocess
import sysconfig
import tarfile
import tempfile
import unittest
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.environ.get("CONFSMOE_SOURCE_ROOT", os.path.normpath(os.path.join(HERE, "..", "..")))
WHEEL = os.environ.get("CONFSMOE_WHEEL")
SDIST = os.environ.get("CONFSMOE_SDIST")
BASE_PYTHON = "/usr/bin/python3"

# Imports the installed package from outside the source tree and runs one gate forward.
CHECK = r"""
import importlib.metadata, sys, numpy as np
import confsmoe
assert "torch" not in sys.modules, "import confsmoe must not import torch"
print("version", confsmoe.__version__)
print("distribution", importlib.metadata.version("confsmoe"))
print("package", confsmoe.__file__)
print("library", confsmoe.library_path)
with confsmoe.Context(seed=1) as ctx:
    experts = [confsmoe.Expert(ctx, 4) for _ in range(2)]
    gate = confsmoe.Gate(ctx, experts, k=1, combine="router_softmax")
    print("forward", gate.forward(np.ones((3, 4), np.float32)).y.shape)
"""


def project_version():
    with open(os.path.join(SOURCE_ROOT, "meson.build")) as f:
        return re.search(r"version:\s*'([0-9.]+)'", f.read()).group(1)


def package_modules():
    """The .py files of bindings/python/confsmoe: what the package is made of."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(SOURCE_ROOT, "bindings", "python",
                                                                      "confsmoe", "*.py")))


def tree(root):
    """Every path under root (directories too), relative to it."""
    out = set()
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(parent, name), root))
    return out


def clean_env():
    """The environment without anything that would point Python at another confsmoe; no bytecode
    written by imports, so that the venv's file list changes only through pip."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONFSMOE_LIBRARY", "PYTHONHOME",
                                                          "LD_LIBRARY_PATH", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class FreshVenv:
    """A venv of /usr/bin/python3 in a temporary directory, seeing Debian's site-packages."""

    def __init__(self, test, tmp):
        self.test = test
        self.dir = os.path.join(tmp, "venv")
        self.run([BASE_PYTHON, "-m", "venv", "--system-site-packages", self.dir])
        self.python = os.path.join(self.dir, "bin", "python")
        self.site = self.run([self.python, "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"]).strip()

    def run(self, cmd, cwd=None):
        r = subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True)
        self.test.assertEqual(r.returncode, 0, "%s failed:\n%s\n%s" % (" ".join(cmd), r.stdout, r.stderr))
        return r.stdout

    def pip(self, *args):
        return self.run([self.python, "-m", "pip", "--disable-pip-version-check", *args])

    def check_install_import_uninstall(self, requirement):
        """pip install requirement, import confsmoe from it, pip uninstall: the venv as before."""
        before = tree(self.dir)
        self.pip("install", "--no-deps", requirement)
        installed = tree(self.dir) - before
        package = os.path.join(self.site, "confsmoe")
        self.test.assertIn(os.path.relpath(os.path.join(package, "libconfsmoe.so.0"), self.dir), installed)

        out = self.run([self.python, "-c", CHECK], cwd=os.path.dirname(self.dir))
        lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
        # the C library's version, the distribution's (pyproject.toml takes meson's) and meson.build's
        self.test.assertEqual(lines["version"], project_version())
        self.test.assertEqual(lines["distribution"], project_version())
        self.test.assertEqual(lines["package"], os.path.join(package, "__init__.py"))
        self.test.assertEqual(lines["library"], os.path.join(package, "libconfsmoe.so.0"))
        self.test.assertEqual(lines["forward"], "(3, 4)")

        self.pip("uninstall", "--yes", "confsmoe")
        self.test.assertEqual(sorted(tree(self.dir) - before), [], "left behind by pip uninstall")
        self.test.assertEqual(sorted(before - tree(self.dir)), [], "removed by pip install + uninstall")


@unittest.skipIf(not WHEEL, "CONFSMOE_WHEEL (the wheel tests/python/pypi_venv.sh builds) is not set")
class TestWheel(unittest.TestCase):
    def setUp(self):
        self.dist_info = "confsmoe-%s.dist-info/" % project_version()

    def test_tag_is_any_python_3_on_this_platform(self):
        # pure Python + a C library that does not link against Python (test below): one wheel for
        # every CPython 3 on this platform, neither cp3X-cp3X nor "any"
        platform = re.sub(r"[-.]", "_", sysconfig.get_platform())
        self.assertEqual(os.path.basename(WHEEL), "confsmoe-%s-py3-none-%s.whl" % (project_version(), platform))
        with zipfile.ZipFile(WHEEL) as whl:
            wheel_info = email.parser.Parser().parsestr(whl.read(self.dist_info + "WHEEL").decode())
        self.assertEqual(wheel_info.get_all("Tag"), ["py3-none-" + platform])
        self.assertEqual(wheel_info["Root-Is-Purelib"], "false")

    def test_library_does_not_link_against_python(self):
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(WHEEL) as whl:
            library = whl.extract("confsmoe/libconfsmoe.so.0", tmp)
            dynamic = subprocess.run(["readelf", "--dynamic", library], check=True, capture_output=True,
                                     text=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.*)\]", dynamic)
        self.assertIn("libm.so.6", needed)
        self.assertEqual([n for n in needed if "python" in n], [])
        self.assertIn("Library soname: [libconfsmoe.so.0]", dynamic)

    def test_contents_are_the_package_and_the_library_only(self):
        # no headers, confsmoe.pc, static library, examples, tests, or the meson-install _paths.py
        expected = {"confsmoe/" + m for m in package_modules()} | {"confsmoe/libconfsmoe.so.0"}
        expected |= {self.dist_info + f for f in ("METADATA", "WHEEL", "RECORD")}
        with zipfile.ZipFile(WHEEL) as whl:
            self.assertEqual(sorted(whl.namelist()), sorted(expected))

    def test_record_hashes_match(self):
        # the tag rewrite (bindings/python/pep517) keeps RECORD true: pip checks it on install
        with zipfile.ZipFile(WHEEL) as whl:
            rows = [line.rsplit(",", 2) for line in whl.read(self.dist_info + "RECORD").decode().splitlines()]
            self.assertEqual(sorted(r[0] for r in rows), sorted(whl.namelist()))
            for name, digest, size in rows:
                if name == self.dist_info + "RECORD":
                    self.assertEqual((digest, size), ("", ""))
                    continue
                data = whl.read(name)
                expected = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                self.assertEqual((digest, int(size)), (expected, len(data)), name)

    def test_metadata(self):
        with zipfile.ZipFile(WHEEL) as whl:
            meta = email.parser.Parser().parsestr(whl.read(self.dist_info + "METADATA").decode())
        self.assertEqual(meta["Name"], "confsmoe")
        self.assertEqual(meta["Version"], project_version())
        self.assertEqual(meta["Requires-Python"], ">=3.9")
        self.assertEqual(meta.get_all("Provides-Extra"), ["torch"])
        requires = meta.get_all("Requires-Dist")
        self.assertIn("numpy>=1.24", requires)
        self.assertIn('torch>=1.13; extra == "torch"', requires)
        self.assertEqual(len(requires), 2, requires)

    def test_install_import_uninstall_in_a_fresh_venv(self):
        with tempfile.TemporaryDirectory() as tmp:
            FreshVenv(self, tmp).check_install_import_uninstall(WHEEL)


@unittest.skipIf(not SDIST, "CONFSMOE_SDIST (the sdist tests/python/pypi_venv.sh builds) is not set")
class TestSdist(unittest.TestCase):
    def test_holds_what_the_build_needs(self):
        top = "confsmoe-%s/" % project_version()
        with tarfile.open(SDIST) as tar:
            names = set(tar.getnames())
        needed = ["PKG-INFO", "pyproject.toml", "LICENSE", "README.md", "bindings/README.md", "meson.build",
                  "meson_options.txt", "include/meson.build", "include/confsmoe.h", "include/confsmoe_version.h.in",
                  "lib/meson.build", "lib/confsmoe.map", "lib/gate.c", "bindings/meson.build",
                  "bindings/python/meson.build", "bindings/python/pep517/confsmoe_build_backend.py"]
        needed += ["bindings/python/confsmoe/" + module for module in package_modules()]
        # meson dist archives the git HEAD: a file not committed yet is missing here
        self.assertEqual([path for path in needed if top + path not in names], [], "missing from the sdist")
        # the sdist is the git-tracked tree: no build directories
        self.assertEqual(sorted(n for n in names if re.match(re.escape(top) + r"(build|\.mesonpy)", n)), [])

    def test_builds_installs_and_uninstalls_in_a_fresh_venv(self):
        with tempfile.TemporaryDirectory() as tmp:
            FreshVenv(self, tmp).check_install_import_uninstall(SDIST)


if __name__ == "__main__":
    unittest.main()
