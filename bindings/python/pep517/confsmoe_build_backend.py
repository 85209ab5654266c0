"""The PEP 517 build backend of pyproject.toml: meson-python's, with the wheel tag the package has.

meson-python tags a wheel that has files in platlib as holding extension modules of one CPython
(``cp311-cp311-linux_x86_64``). The confsmoe wheel holds pure Python plus libconfsmoe.so.0, a C
library that is loaded with ctypes and does not link against Python, so the one wheel serves
every CPython 3 on its platform: ``build_wheel`` renames it ``py3-none-<platform>`` and rewrites
its WHEEL file (and that file's RECORD line) to say so. Everything else is meson-python's.
"""
import base64
import hashlib
import os
import zipfile

import mesonpy
from mesonpy import (build_editable, build_sdist, get_requires_for_build_editable,  # noqa: F401 (the hooks)
                     get_requires_for_build_sdist, get_requires_for_build_wheel)

PYTHON_TAG, ABI_TAG = "py3", "none"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    built = mesonpy.build_wheel(wheel_directory, config_settings, metadata_directory)
    return _retag(wheel_directory, built)


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _retag(directory, name):
    distribution, version, _python, _abi, platform = name[:-len(".whl")].split("-")
    tag = "%s-%s-%s" % (PYTHON_TAG, ABI_TAG, platform)
    renamed = "%s-%s-%s.whl" % (distribution, version, tag)
    dist_info = "%s-%s.dist-info/" % (distribution, version)
    source, target = os.path.join(directory, name), os.path.join(directory, renamed)
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new:
        wheel_info = old.read(dist_info + "WHEEL").decode()
        wheel_info = "".join("Tag: %s\n" % tag if line.startswith("Tag:") else line
                             for line in wheel_info.splitlines(keepends=True)).encode()
        record = []
        for line in old.read(dist_info + "RECORD").decode().splitlines():
            if line.startswith(dist_info + "WHEEL,"):
                line = "%sWHEEL,%s,%d" % (dist_info, _record_hash(wheel_info), len(wheel_info))
            record.append(line + "\n")
        for item in old.infolist():
            if item.filename == dist_info + "WHEEL":
                new.writestr(item, wheel_info)
            elif item.filename != dist_info + "RECORD":
                new.writestr(item, old.read(item))
        new.writestr(old.getinfo(dist_info + "RECORD"), "".join(record))
    os.remove(source)
    return renamed
