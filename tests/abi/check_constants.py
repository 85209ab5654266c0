"""The header's constants are the only source: everything that restates them must agree.

- CONFSMOE_STATUS_MAP(X) in the header lists every status once, with values 0, -1, -2, ...
  in order, and each entry's CONFSMOE_<NAME> macro holds the entry's value (and every
  CONFSMOE_OK / CONFSMOE_E_* macro has an entry).
- The Python bindings: every module-level integer constant NAME whose CONFSMOE_NAME the header
  defines has the header's value; errors.py defines (and exports) every status, has one
  exception class per error status (documented as that status, and listed in _BY_STATUS);
  _params.py's string names of enum values name header values.
- docs/API.md's status table lists every status of the map, in order, with its value.

The files are read, not imported, so that no library needs to be built or found.
Prints each difference and exits 1 on any.

Usage: check_constants.py HEADER PYTHON_PACKAGE_DIR API_MD
"""
import ast
import os
import re
import sys

# _params.py's enum groups and the header prefix of each (a define belongs to the longest prefix).
ENUM_PREFIXES = {
    "router": "ROUTER_", "combine": "COMBINE_", "confidence": "CONFIDENCE_", "target": "TARGET_",
    "router_grad": "ROUTER_GRAD_", "load_loss": "LOAD_LOSS_", "kind": "OPTIM_", "gate": "MODEL_GATE_",
    "imputation": "IMPUTE_", "writeback": "WRITEBACK_",
}

# Python constants named otherwise than their header macro (CONFSMOE_ + the Python name).
PYTHON_ALIASES = {"ADAM": "CONFSMOE_OPTIM_ADAM", "SGD": "CONFSMOE_OPTIM_SGD"}

ENTRY = re.compile(r'X\(\s*(\w+)\s*,\s*(-?\d+)\s*,\s*"((?:[^"\\]|\\.)*)"\s*\)')


def header_defines(text):
    """Object-like macros CONFSMOE_* with an integer value, as {name: value}."""
    defines = {}
    for m in re.finditer(r"^[ \t]*#[ \t]*define[ \t]+(CONFSMOE_\w+)[ \t]+\(?[ \t]*(-?\d+)[ \t]*\)?[ \t]*(?:/\*|$)",
                         text, flags=re.M):
        defines[m.group(1)] = int(m.group(2))
    return defines


def status_map(text, failures):
    """The entries of CONFSMOE_STATUS_MAP as [(name, value, text)]."""
    m = re.search(r"^[ \t]*#[ \t]*define[ \t]+CONFSMOE_STATUS_MAP\(X\)((?:[^\n]*\\\n)*[^\n]*)", text, flags=re.M)
    if not m:
        failures.append("the header has no CONFSMOE_STATUS_MAP(X)")
        return []
    body = m.group(1).replace("\\\n", " ")
    leftover = ENTRY.sub(" ", body).strip()
    if leftover:
        failures.append("CONFSMOE_STATUS_MAP holds something other than X(NAME, VALUE, \"TEXT\") entries: %r"
                        % leftover)
    return [(n, int(v), t) for n, v, t in ENTRY.findall(body)]


def check_map(entries, defines, failures):
    names = [n for n, _, _ in entries]
    for i, (name, value, text) in enumerate(entries):
        if value != -i:
            failures.append("CONFSMOE_STATUS_MAP entry %d (%s) has value %d, expected %d: the values are "
                            "0, -1, -2, ... in order" % (i, name, value, -i))
        macro = "CONFSMOE_" + name
        if macro not in defines:
            failures.append("CONFSMOE_STATUS_MAP lists %s, but the header defines no %s" % (name, macro))
        elif defines[macro] != value:
            failures.append("%s is %d, CONFSMOE_STATUS_MAP says %d" % (macro, defines[macro], value))
        if not text:
            failures.append("CONFSMOE_STATUS_MAP gives %s an empty text" % name)
    for macro in defines:
        if (macro == "CONFSMOE_OK" or macro.startswith("CONFSMOE_E_")) and macro[len("CONFSMOE_"):] not in names:
            failures.append("the header defines %s, which CONFSMOE_STATUS_MAP does not list" % macro)
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        failures.append("CONFSMOE_STATUS_MAP lists %s more than once" % ", ".join(dups))


def int_value(node):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = int_value(node.operand)
        return None if inner is None else -inner
    return None


def module_int_constants(tree):
    """Module-level NAME = int and A, B = int, int, as {name: value}."""
    found = {}
    for stmt in tree.body:
        if not isinstance(stmt, ast.Assign):
            continue
        for target in stmt.targets:
            if isinstance(target, ast.Name):
                pairs = [(target, stmt.value)]
            elif isinstance(target, ast.Tuple) and isinstance(stmt.value, ast.Tuple) \
                    and len(target.elts) == len(stmt.value.elts):
                pairs = list(zip(target.elts, stmt.value.elts))
            else:
                continue
            for name, value in pairs:
                v = int_value(value)
                if isinstance(name, ast.Name) and v is not None:
                    found[name.id] = v
    return found


def module_assignment(tree, name):
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
            return stmt.value
    return None


def check_python_constants(package, defines, failures):
    checked = 0
    for file in sorted(os.listdir(package)):
        if not file.endswith(".py"):
            continue
        path = os.path.join(package, file)
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        for name, value in module_int_constants(tree).items():
            macro = PYTHON_ALIASES.get(name, "CONFSMOE_" + name)
            if macro in defines:
                checked += 1
                if defines[macro] != value:
                    failures.append("%s: %s = %d, but the header's %s is %d" % (path, name, value, macro,
                                                                              defines[macro]))
    return checked


def check_errors_py(path, entries, failures):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    constants = module_int_constants(tree)
    for name, value, _ in entries:
        if name not in constants:
            failures.append("%s defines no %s (CONFSMOE_%s)" % (path, name, name))
    exported = module_assignment(tree, "__all__")
    exported = {e.value for e in exported.elts} if isinstance(exported, ast.List) else set()
    missing = [n for n, _, _ in entries if n not in exported]
    if missing:
        failures.append("%s: __all__ lacks %s" % (path, ", ".join(missing)))

    # class X(...): status = E_NAME, documented "CONFSMOE_E_NAME: ..."
    by_status = {}
    for stmt in tree.body:
        if not isinstance(stmt, ast.ClassDef):
            continue
        for item in stmt.body:
            if isinstance(item, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "status"
                                                    for t in item.targets) and isinstance(item.value, ast.Name):
                code = item.value.id
                by_status.setdefault(code, []).append(stmt.name)
                doc = ast.get_docstring(stmt) or ""
                if not doc.startswith("CONFSMOE_%s:" % code):
                    failures.append("%s: class %s has status %s but its docstring does not start with "
                                    "\"CONFSMOE_%s:\"" % (path, stmt.name, code, code))
    for name, value, _ in entries:
        classes = by_status.get(name, [])
        if value < 0 and len(classes) != 1:
            failures.append("%s: %d exception classes have status %s (%s), expected 1"
                            % (path, len(classes), name, ", ".join(classes) or "none"))
    unknown = sorted(set(by_status) - {n for n, _, _ in entries})
    if unknown:
        failures.append("%s: exception classes with statuses the map does not list: %s" % (path, ", ".join(unknown)))

    table = module_assignment(tree, "_BY_STATUS")
    listed = {n.id for n in ast.walk(table) if isinstance(n, ast.Name)} if table is not None else set()
    for code, classes in by_status.items():
        for cls in classes:
            if cls not in listed:
                failures.append("%s: class %s (status %s) is not in _BY_STATUS" % (path, cls, code))
    return len(by_status)


def check_enum_names(path, defines, failures):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    enums = module_assignment(tree, "ENUMS")
    if not isinstance(enums, ast.Dict):
        failures.append("%s has no ENUMS dictionary" % path)
        return 0
    checked = 0
    groups = {}
    for key, value in zip(enums.keys, enums.values):
        group = key.value
        if group not in ENUM_PREFIXES:
            failures.append("%s: ENUMS[%r] has no header prefix in check_constants.py's ENUM_PREFIXES"
                            % (path, group))
            continue
        groups[group] = {k.value: int_value(v) for k, v in zip(value.keys, value.values)}

    def owner(macro):
        """The ENUMS group whose prefix is the longest one macro starts with."""
        best = None
        for group, prefix in ENUM_PREFIXES.items():
            if macro.startswith("CONFSMOE_" + prefix) and (best is None or len(prefix) > len(ENUM_PREFIXES[best])):
                best = group
        return best

    for group, names in groups.items():
        prefix = "CONFSMOE_" + ENUM_PREFIXES[group]
        own = {m: v for m, v in defines.items() if owner(m) == group}
        if not own:
            failures.append("%s: the header defines no %s* for ENUMS[%r]" % (path, prefix, group))
            continue
        for text, value in names.items():
            checked += 1
            macro = prefix + re.sub(r"[^A-Za-z0-9]", "_", text).upper()
            if macro in own and own[macro] != value:
                failures.append("%s: ENUMS[%r][%r] = %s, but the header's %s is %d"
                                % (path, group, text, value, macro, own[macro]))
            elif macro not in own and value not in own.values():
                failures.append("%s: ENUMS[%r][%r] = %s is none of the header's %s* values"
                                % (path, group, text, value, prefix))
        for macro, value in own.items():
            if value not in names.values():
                failures.append("%s: ENUMS[%r] has no name for %s (%d)" % (path, group, macro, value))
    return checked


def check_api_md(path, entries, failures):
    text = open(path, encoding="utf-8").read()
    rows = re.findall(r"^\|\s*`CONFSMOE_(OK|E_\w+)`\s*\|\s*(-?\d+)\s*\|", text, flags=re.M)
    table = [(n, int(v)) for n, v in rows]
    want = [(n, v) for n, v, _ in entries]
    if table != want:
        for row in table:
            if row not in want:
                failures.append("%s: the status table has %s = %d, which the header's map does not" % (path, *row))
        for row in want:
            if row not in table:
                failures.append("%s: the status table lacks CONFSMOE_%s (%d)" % (path, *row))
        if sorted(table) == sorted(want):
            failures.append("%s: the status table is not in the order of the header's map" % path)
    return len(table)


def main():
    header, package, api_md = sys.argv[1:4]
    text = open(header, encoding="utf-8").read()
    # Comments could hide or fake a define: drop them first (the map's texts hold no comment marks).
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    failures = []
    defines = header_defines(text)
    entries = status_map(text, failures)
    check_map(entries, defines, failures)
    n_py = check_python_constants(package, defines, failures)
    n_classes = check_errors_py(os.path.join(package, "errors.py"), entries, failures)
    n_enum = check_enum_names(os.path.join(package, "_params.py"), defines, failures)
    n_doc = check_api_md(api_md, entries, failures)

    print("header: %d integer CONFSMOE_* macros, %d statuses in CONFSMOE_STATUS_MAP (%s)"
          % (len(defines), len(entries), header))
    print("python: %d constants named after header macros, %d exception classes, %d enum value names (%s)"
          % (n_py, n_classes, n_enum, package))
    print("docs: %d rows in the status table (%s)" % (n_doc, api_md))
    for f in failures:
        print("FAIL: " + f)
    if not failures:
        print("constants: header, bindings and docs agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
