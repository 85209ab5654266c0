"""The exported API three ways must agree: the functions declared CONFSMOE_API in the
header, the names the linker version script exports, and the dynamic symbols of the
built library (nm -D --defined-only). Prints each difference and exits 1 on any.

Usage: check_symbols.py HEADER MAP LIBRARY
"""
import fnmatch
import re
import subprocess
import sys


def header_functions(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    # Drop preprocessor lines (with continuations), so that `#define CONFSMOE_API ...` is not a declaration.
    text = re.sub(r"^[ \t]*#(?:[^\n]*\\\n)*[^\n]*", " ", text, flags=re.M)
    names = []
    for decl in text.split(";"):
        decl = " ".join(decl.split())
        m = re.search(r"\bCONFSMOE_API\b[^(]*?\b([A-Za-z_]\w*)\s*\(", decl)
        if m:
            names.append(m.group(1))
    return names


def map_patterns(path):
    """(global, local) patterns of every version node; a pattern may be an exact name or a glob."""
    text = re.sub(r"/\*.*?\*/", " ", open(path, encoding="utf-8").read(), flags=re.S)
    text = re.sub(r"#[^\n]*", " ", text)
    glob, local = [], []
    for body in re.findall(r"\{(.*?)\}", text, flags=re.S):
        scope = glob
        for item in re.split(r";", body):
            item = item.strip()
            for label, target in (("global:", glob), ("local:", local)):
                if item.startswith(label):
                    scope, item = target, item[len(label):].strip()
            if item:
                scope.append(item)
    return glob, local


def exported_symbols(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], check=True, capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        fields = line.split()
        # Type A entries are the version nodes themselves (CONFSMOE_0.1), not symbols.
        if len(fields) == 3 and fields[1] != "A":
            names.append(fields[2].split("@")[0])
    return names


def main():
    header, mapfile, lib = sys.argv[1:4]
    declared = header_functions(header)
    glob, local = map_patterns(mapfile)
    exported = exported_symbols(lib)
    failures = []

    dups = sorted({n for n in declared if declared.count(n) > 1})
    if dups:
        failures.append(("declared more than once in the header", dups))

    def in_map(name):
        return any(fnmatch.fnmatchcase(name, p) for p in glob)

    # The map may list names or globs (confsmoe_*): exact names must each be declared,
    # and every declared function must be matched, or the linker would hide it.
    exact = [p for p in glob if not any(c in p for c in "*?[")]
    failures.append(("listed in the version script, not declared CONFSMOE_API", sorted(set(exact) - set(declared))))
    failures.append(("declared CONFSMOE_API, not exported by the version script",
                     sorted(n for n in set(declared) if not in_map(n))))
    failures.append(("exported by the library, not declared CONFSMOE_API", sorted(set(exported) - set(declared))))
    failures.append(("declared CONFSMOE_API, missing from the library", sorted(set(declared) - set(exported))))
    failures.append(("exported by the library, not matched by the version script",
                     sorted(n for n in set(exported) if not in_map(n))))
    failures = [(what, names) for what, names in failures if names]

    print(f"header: {len(set(declared))} CONFSMOE_API functions ({header})")
    print(f"version script: global {glob}, local {local} ({mapfile}); "
          f"{sum(map(in_map, set(declared)))} declared functions matched")
    print(f"library: {len(set(exported))} exported symbols ({lib})")
    for what, names in failures:
        print(f"FAIL: {len(names)} {what}:")
        for n in names:
            print(f"    {n}")
    if not failures:
        print("symbols: header, version script and library agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
