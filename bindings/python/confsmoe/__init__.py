"""Python bindings of libconfsmoe (sparse Mixture-of-Experts with a confidence-guided gate).

    import numpy as np, confsmoe
    with confsmoe.Context(seed=1) as ctx:
        experts = [confsmoe.Expert(ctx, 16) for _ in range(4)]
        gate = confsmoe.Gate(ctx, experts, k=2, n_classes=3)
        out = gate.forward(np.random.rand(8, 16).astype(np.float32),
                           labels=np.zeros(8, np.int32), train=True)
        dx = gate.backward(out.saved, np.ones_like(out.y))

The library is found through CONFSMOE_LIBRARY (a path), then next to this package, then in
the libdir it was installed to, then through the system loader. ``__version__`` is the version of
the loaded C library. ``confsmoe.torch`` (imported on demand) bridges to PyTorch.
"""
from . import _lib
from ._layer import Param, Saved
from ._lib import library_path, version_number, version_string
from .context import LOG_DEBUG, LOG_ERROR, LOG_INFO, LOG_WARN, Context
from .errors import (ClosedError, CommunicationError, ConfSMoEError, DTypeError, FileIOError, FormatError, InternalError,
                     InvalidArgumentError, NumericError, OutOfMemoryError, ShapeError, StateError,
                     UnsupportedError, VersionError, check, error_class)
from .expert import Expert
from .gate import STATS_LAST_CALL, STATS_TOTAL, Gate, GateOutput
from .imputer import Imputer
from .model import Model, StepResult, load_checkpoint, save_checkpoint
from .optim import ADAM, SGD, Optimizer
from .tensor import F32, I32, U8, Tensor

__version__ = version_string()
#: Major version of the C API these bindings were written for.
API_MAJOR = _lib.EXPECTED_MAJOR

# Constants of include/confsmoe.h (the string names of the enums work too, see Gate/Model).
ROUTER_SOFTMAX, ROUTER_GAUSSIAN, ROUTER_LAPLACIAN = 0, 1, 2
COMBINE_ROUTER_SOFTMAX, COMBINE_CONFIDENCE = 0, 1
CONFIDENCE_TOKEN, CONFIDENCE_EXPERT = 0, 1
TARGET_SINGLE_LABEL, TARGET_MULTI_LABEL = 0, 1
ROUTER_GRAD_FROZEN, ROUTER_GRAD_TRAINABLE, ROUTER_GRAD_SCORE = 0, 1, 2
LOAD_LOSS_NONE, LOAD_LOSS_CV, LOAD_LOSS_ENTROPY = 0, 1, 2
MODEL_GATE_CONFIDENCE, MODEL_GATE_SOFTMAX, MODEL_GATE_GAUSSIAN, MODEL_GATE_LAPLACIAN = 0, 1, 2, 3
IMPUTE_TWO_STAGE, IMPUTE_MEAN = 0, 1
WRITEBACK_LN_IMP, WRITEBACK_RESIDUAL = 0, 1
MAX_DIMS = 4


def status_string(status):
    """Static text of a status (confsmoe_status_string)."""
    return _lib.api.status_string(int(status)).decode()


def __getattr__(name):  # lazy: PyTorch is imported only when the bridge is used
    if name == "torch":
        import importlib
        return importlib.import_module(".torch", __name__)
    raise AttributeError("module 'confsmoe' has no attribute %r" % name)


__all__ = [
    "Context", "Tensor", "Expert", "Gate", "Imputer", "Model", "Optimizer", "Saved", "Param",
    "GateOutput", "StepResult", "save_checkpoint", "load_checkpoint",
    "ConfSMoEError", "InvalidArgumentError", "ShapeError", "DTypeError", "OutOfMemoryError",
    "StateError", "ClosedError", "UnsupportedError", "NumericError", "VersionError", "InternalError",
    "FileIOError", "FormatError", "CommunicationError", "check", "error_class", "status_string",
    "version_string", "version_number", "library_path", "__version__",
    "F32", "I32", "U8", "ADAM", "SGD", "STATS_LAST_CALL", "STATS_TOTAL",
    "LOG_ERROR", "LOG_WARN", "LOG_INFO", "LOG_DEBUG",
]
