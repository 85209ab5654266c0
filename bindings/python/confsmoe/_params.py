"""Keyword arguments -> mirrored options structs, with defaults from the C _init functions."""
import ctypes

__all__ = ["fill", "ENUMS", "struct_dict"]

#: String names accepted for the enum fields (integers are accepted too).
ENUMS = {
    "router": {"softmax": 0, "gaussian": 1, "laplacian": 2},
    "combine": {"router_softmax": 0, "softmax": 0, "confidence": 1},
    "confidence": {"token": 0, "expert": 1},
    "target": {"single_label": 0, "multi_label": 1},
    "router_grad": {"frozen": 0, "trainable": 1, "score": 2},
    "load_loss": {"none": 0, "cv": 1, "entropy": 2},
    "kind": {"adam": 0, "sgd": 1},
    "gate": {"confidence": 0, "softmax": 1, "gaussian": 2, "laplacian": 3},
    "imputation": {"two_stage": 0, "two-stage": 0, "mean": 1},
    "writeback": {"ln_imp": 0, "ln-imp": 0, "residual": 1},
}

#: 0/1 fields that take a bool.
FLAGS = {"noisy", "detach_target", "compat", "renormalize", "separate_value", "multilabel", "predict_pool_mean"}


def _scalar_fields(struct):
    out = {}
    for name, ctype in struct._fields_:
        if name == "struct_size":
            continue
        if issubclass(ctype, (ctypes._SimpleCData,)) and ctype not in (ctypes.c_void_p, ctypes.c_char_p):
            out[name] = ctype
    return out


def fill(struct, init_fn, kwargs, what, skip=()):
    """A struct filled by the C init function, then by ``kwargs`` (unknown names: TypeError)."""
    p = struct()
    init_fn(ctypes.byref(p))
    fields = _scalar_fields(struct)
    for key, value in kwargs.items():
        if key not in fields or key in skip:
            raise TypeError("%s got an unexpected keyword argument %r (options: %s)"
                            % (what, key, ", ".join(sorted(set(fields) - set(skip)))))
        if isinstance(value, str):
            table = ENUMS.get(key)
            if table is None:
                raise TypeError("%s: %s takes a number, not %r" % (what, key, value))
            try:
                value = table[value.lower()]
            except KeyError:
                raise ValueError("%s: %s must be one of %s, got %r" % (what, key, sorted(table), value)) from None
        elif key in FLAGS or isinstance(value, bool):
            value = int(bool(value)) if isinstance(value, (bool, int)) else value
        ctype = fields[key]
        if ctype in (ctypes.c_float, ctypes.c_double):
            value = float(value)
        else:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError("%s: %s must be an integer, got %r" % (what, key, value))
            value = int(value)
        setattr(p, key, value)
    return p


def struct_dict(p):
    """The scalar fields of a filled struct, as a dict."""
    return {name: getattr(p, name) for name in _scalar_fields(type(p))}


def tokens_option(options, n_modalities, what):
    """Splits the ``tokens`` option, an int (S for every modality) or a sequence of S_m, into
    (options for fill, the S_m tuple, the ctypes array for modality_tokens or None)."""
    options = dict(options)
    tokens = options.pop("tokens", 1)
    if isinstance(tokens, (list, tuple)):
        per = tuple(int(t) for t in tokens)
        if len(per) != n_modalities:
            raise ValueError("%s: tokens has %d entries, expected one per modality (%d)"
                             % (what, len(per), n_modalities))
        return options, per, (ctypes.c_int64 * max(len(per), 1))(*per)
    if isinstance(tokens, float) and not tokens.is_integer():
        raise TypeError("%s: tokens must be an integer or a list of integers, got %r" % (what, tokens))
    options["tokens"] = int(tokens)
    return options, (int(tokens),) * n_modalities, None


def defaults(struct, init_fn):
    """The C library's defaults of an options struct."""
    return struct_dict(fill(struct, init_fn, {}, ""))
