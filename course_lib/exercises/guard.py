"""Keep the course's own implementations and PyTorch's whole-task shortcuts out of reach of a solution.

A checker calls the reader's function inside :func:`guarded_call`. While it runs, four watchers are on:

1. ``sys.setprofile`` sees every Python frame that starts, however it was reached (an alias, ``getattr``,
   a copied function object, ``map``, a closure, another thread started by ``threading``). A frame whose
   code lives in ``course_lib`` (outside an allow-list: the argument checks) is refused, and so is a
   frame whose *bytecode* equals a ``course_lib`` function's — what ``exec(inspect.getsource(...))``
   of a library function produces. It also sees C functions called from Python: the PyTorch entry
   points that do a task whole, ``sys.setprofile``/``settrace`` (switching the watchers off), and new
   threads or processes (work handed elsewhere).
2. A ``TorchFunctionMode`` sees every PyTorch function, including those called from C (``map``,
   ``functools.partial``) and ``torch.ops.aten.*``.
3. A ``TorchDispatchMode`` sees the ATen kernels that run (e.g.
   ``_scaled_dot_product_flash_attention_for_cpu`` whichever way it was reached, TorchScript included).
4. After the call: the watchers must still be in place, and no refusal may have been swallowed
   (a refusal is a ``BaseException``, and it is also recorded, so ``except BaseException`` does not
   hide it).

The dispatch watcher also tallies the work of the call (:class:`Work`, read with :func:`last_work`): the
largest tensor an operation produced (views excluded: they allocate nothing), the entries all operations
wrote, the multiply-adds of the matrix products and the number of operations. A checker of a kernel that
must *skip* work (a sliding window, causal tiles) or run in chunks compares them with what the dense or
token-by-token computation needs. With ``max_elements``, a call that built a larger tensor raises
:class:`TooLarge` after it returns: how an exercise checks that a solution never held what the mechanism
avoids (FlashAttention's ``T x S`` scores, a KV cache copied for every query head).

What stays possible is listed in TEACHING.md ("What the checkers cannot stop"): copying the library's
source by hand with edits, work handed to a thread or process that existed before the call, and code
that tampers with the checker itself (a grader should read submissions it has doubts about).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "Rules",
    "Refused",
    "ExerciseTimeout",
    "TooLarge",
    "Work",
    "guarded_call",
    "last_work",
    "COURSE_DIR",
]

COURSE_DIR = Path(__file__).resolve().parents[1]
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_COURSE_PREFIX = str(COURSE_DIR) + os.sep
_THIS_FILE = str(Path(__file__).resolve())
_STDLIB = str(Path(os.__file__).resolve().parent) + os.sep  # subprocess.py, threading.py, ...


def _in_stdlib(filename: str) -> bool:
    """A file of Python's standard library (not of a package installed beside it, as in conda)."""
    return filename.startswith(_STDLIB) and not any(
        part in filename for part in ("site-packages", "dist-packages")
    )


# Files of course_lib a solution may call: argument checks and dtype/scale rules hold no answer.
ALLOWED_COURSE_FILES = frozenset({str(COURSE_DIR / "checks.py"), str(COURSE_DIR / "__init__.py")})

# PyTorch names that compute attention whole; any function, C builtin or ATen op whose name contains
# one of these is refused in every exercise.
ATTENTION_SHORTCUTS = (
    "scaled_dot_product",
    "flash_attention",
    "efficient_attention",
    "cudnn_attention",
    "multi_head_attention",
    "multiheadattention",
    "_triton_scaled_dot",
    "_fused_sdp",
    "transformer_encoder_layer",
    "fused_attention",
)

# C functions that would switch the watchers off or hand work to another thread or process.
_TAMPERING = frozenset({"setprofile", "settrace", "setprofile_all_threads", "settrace_all_threads"})
_ESCAPES = frozenset(
    {
        "start_new_thread",
        "start_joinable_thread",
        "_start_new_thread",
        "fork",
        "forkpty",
        "fork_exec",
        "posix_spawn",
        "posix_spawnp",
        "system",
        "execv",
        "execve",
        "spawnv",
        "spawnve",
        "popen",
    }
)


class Refused(BaseException):
    """A solution called something it must not (a ``BaseException``, so ``except Exception`` lets it pass)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ExerciseTimeout(BaseException):
    """The reader's function ran past the exercise's time limit."""


class TooLarge(BaseException):
    """The reader's function built a tensor larger than the case allows (``max_elements``)."""

    def __init__(self, elements: int, shape: tuple[int, ...], op: str, limit: int):
        super().__init__(
            f"a tensor of {elements} elements, shape {shape}, from {op}; at most {limit} allowed"
        )
        self.elements, self.shape, self.op, self.limit = elements, shape, op, limit


@dataclass(frozen=True)
class Work:
    """What the ATen operations of one guarded call computed (views, which compute nothing, excluded).

    ``largest``: entries of the largest tensor one operation produced; ``elements``: entries written by
    all operations together; ``multiply_adds``: those of the matrix products (``mm``, ``bmm``, ``addmm``,
    ``baddbmm``, ``dot``, ``mv``, ... — what ``@``, ``matmul`` and ``einsum`` become); ``operations``: how
    many operations ran (a loop over tokens runs thousands, a loop over chunks a few per chunk).
    """

    largest: int = 0
    elements: int = 0
    multiply_adds: int = 0
    operations: int = 0


# Matrix products, and where their two factors sit among the arguments: (a, b) with a (..., n, k) and
# b (..., k, m) cost a.numel() * m multiply-adds; a vector product costs a.numel().
_PRODUCTS = {
    "mm": 0,
    "bmm": 0,
    "addmm": 1,
    "baddbmm": 1,
    "addbmm": 1,
    "mv": 0,
    "addmv": 1,
    "dot": 0,
    "vdot": 0,
}
# Operations that return a view or an alias of their input: no new entries are computed.
_NOT_WORK = frozenset({"_unsafe_view", "lift_fresh", "detach", "alias"})


@dataclass(frozen=True)
class Rules:
    """What one exercise forbids beyond the defaults.

    ``torch_names``: exact names of PyTorch functions/ops that do this exercise whole (``"elu"``,
    ``"softmax"``); ``allow``: qualified names of ``course_lib`` functions the exercise permits
    (e.g. ``"course_lib.standard.causal_mask"``); ``task``: a few words for messages;
    ``processes_from``: directories whose code may start a process while the reader's function runs
    (a compiler: Triton runs ``ptxas`` when it compiles a kernel on a GPU), none by default.
    """

    task: str = "this exercise"
    torch_names: frozenset[str] = field(default_factory=frozenset)
    allow: frozenset[str] = field(default_factory=frozenset)
    processes_from: frozenset[str] = field(default_factory=frozenset)


def _course_name(code: types.CodeType) -> str:
    """``course_lib.module.qualname`` for a code object of a course_lib file."""
    relative = Path(code.co_filename).resolve().relative_to(COURSE_DIR.parent).with_suffix("")
    module = ".".join(relative.parts).removesuffix(".__init__")
    return f"{module}.{getattr(code, 'co_qualname', code.co_name)}"


# ---------------------------------------------------------------------------------------------------
# Bytecode fingerprints of every course_lib function, to recognise an exec'd copy of the library.


_SKIPPED_OPS = frozenset({"CACHE", "PRECALL", "KW_NAMES", "NOP", "RESUME", "EXTENDED_ARG", "PUSH_NULL"})
_SAME_OPS = {"LOAD_METHOD": "LOAD_ATTR", "CALL_METHOD": "CALL", "CALL_FUNCTION": "CALL"}


def _fingerprint(code: types.CodeType) -> tuple:
    """What a function does, independent of where it was compiled: its operations and the names and
    constants they use (the compiler emits slightly different code for a module's own imports)."""
    import dis

    operations = []
    for instruction in dis.get_instructions(code):
        name = instruction.opname
        if name in _SKIPPED_OPS:
            continue
        name = _SAME_OPS.get(name, name)
        if instruction.opcode in dis.hasjrel or instruction.opcode in dis.hasjabs:
            operations.append(name)
        elif "FAST" in name or "DEREF" in name or "CLOSURE" in name:
            operations.append((name, instruction.arg))  # local names may be renamed; their slots stay
        elif instruction.opcode in dis.hasconst and isinstance(instruction.argval, types.CodeType):
            operations.append((name, _fingerprint(instruction.argval)))
        else:
            operations.append((name, repr(instruction.argval)))
    return (code.co_name, tuple(operations))


_FINGERPRINTS: dict[tuple, str] = {}
_INDEXED_MODULES: set[str] = set()
_MIN_BYTECODE = 48  # tiny functions (a getter, `return x`) would match innocent code


def _library_fingerprints() -> dict[tuple, str]:
    """Fingerprints of the functions of every loaded ``course_lib`` module (checkers excluded)."""
    for module_name, module in list(sys.modules.items()):
        if (
            module is None
            or module_name in _INDEXED_MODULES
            or not (module_name == "course_lib" or module_name.startswith("course_lib."))
        ):
            continue
        _INDEXED_MODULES.add(module_name)
        if module_name.startswith("course_lib.exercises"):
            continue  # the checkers are refused by their file; they hold no answer worth copying
        _Indexer(module_name).visit_module(module)
    return _FINGERPRINTS


def _defined_in(code: types.CodeType, module: str) -> bool:
    """Does ``code`` come from the file of ``module``?"""
    loaded = sys.modules.get(module)
    return getattr(loaded, "__file__", None) == code.co_filename


class _Indexer:
    """Adds the fingerprints of one module's functions, methods and nested functions."""

    def __init__(self, module_name: str):
        self.module_name = module_name
        self.seen: set[int] = set()

    def add(self, code: types.CodeType, module: str | None = None) -> None:
        """Index ``code`` under the module that defines it (``course_lib.standard.causal_mask``, not the
        re-export ``course_lib.causal_mask``, whichever module is indexed first)."""
        if id(code) in self.seen:
            return
        self.seen.add(id(code))
        module = module or self.module_name
        if len(code.co_code) >= _MIN_BYTECODE and not code.co_name.startswith("<"):
            key, name = _fingerprint(code), f"{module}.{code.co_qualname}"
            if key not in _FINGERPRINTS or module != self.module_name or _defined_in(code, module):
                _FINGERPRINTS[key] = name
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.add(const, module)

    def visit(self, obj: object, depth: int = 0) -> None:
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, property):
            for accessor in (obj.fget, obj.fset, obj.fdel):
                if accessor is not None:
                    self.visit(accessor, depth)
            return
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType) and code.co_filename.startswith(_COURSE_PREFIX):
            self.add(code, getattr(obj, "__module__", None))
        elif isinstance(obj, type) and depth == 0 and obj.__module__ == self.module_name:
            for member in vars(obj).values():
                self.visit(member, 1)

    def visit_module(self, module: types.ModuleType) -> None:
        for value in list(vars(module).values()):
            self.visit(value)


# ---------------------------------------------------------------------------------------------------
# The watchers.


class _Watch:
    """State shared by the watchers of one guarded call; the first refusal is kept."""

    def __init__(self, rules: Rules, checker: str):
        self.rules = rules
        self.checker = checker
        self.violation: str | None = None
        self.largest = self.elements = self.multiply_adds = self.operations = 0
        self.largest_tensor: tuple[int, tuple[int, ...], str] = (0, (), "")  # elements, shape, ATen op
        self.torch_calls = 0  # PyTorch functions the reader's code called (what a case may limit)
        self.code_verdicts: dict[types.CodeType, str | None] = {}
        self.own_codes = {
            obj.__code__ for obj in (_FunctionWatch.__torch_function__, _DispatchWatch.__torch_dispatch__)
        }
        self.own_codes.update(
            value.__code__
            for value in globals().values()
            if isinstance(value, types.FunctionType) and value.__module__ == __name__
        )
        self.own_codes.update(
            value.__code__ for value in vars(_Watch).values() if isinstance(value, types.FunctionType)
        )

    # -- verdicts ---------------------------------------------------------------------------------
    def refuse(self, message: str) -> None:
        if self.violation is None:
            self.violation = message
        raise Refused(message)

    def torch_name_forbidden(self, name: str) -> str | None:
        lowered = name.lower()
        for pattern in ATTENTION_SHORTCUTS:
            if pattern in lowered:
                return "a PyTorch shortcut that computes attention whole"
        base = lowered.rsplit("::", 1)[-1].split(".", 1)[0].rsplit(".", 1)[-1]
        if base in self.rules.torch_names or base.rstrip("_") in self.rules.torch_names:
            return f"a PyTorch shortcut that does {self.rules.task} whole"
        return None

    def code_verdict(self, code: types.CodeType) -> str | None:
        """Why running ``code`` is refused, or None; cached per code object."""
        if code in self.code_verdicts:
            return self.code_verdicts[code]
        verdict = None
        filename = code.co_filename
        if code in self.own_codes or filename == _THIS_FILE:
            verdict = None
        elif filename.startswith(_COURSE_PREFIX) or filename.startswith(str(COURSE_DIR) + os.sep):
            resolved = str(Path(filename).resolve())
            name = _course_name(code)
            if resolved not in ALLOWED_COURSE_FILES and not any(
                name == allowed or name.startswith(allowed + ".") for allowed in self.rules.allow
            ):
                verdict = (
                    f"your function called {name}, the course's own code ({Path(resolved).name}); "
                    f"write {self.rules.task} yourself"
                )
        elif filename.startswith(_TORCH_DIR):
            qualname = getattr(code, "co_qualname", code.co_name)
            reason = self.torch_name_forbidden(qualname) or self.torch_name_forbidden(code.co_name)
            if reason:
                verdict = f"your function called torch's {qualname}, {reason}"
        elif len(code.co_code) >= _MIN_BYTECODE and not filename.startswith(sys.prefix):
            copied = _library_fingerprints().get(_fingerprint(code))
            if copied and not any(copied.startswith(allowed) for allowed in self.rules.allow):
                if not copied.startswith("course_lib.checks"):
                    verdict = (
                        f"your function runs a copy of {copied} (the course's own code, compiled again); "
                        f"write {self.rules.task} yourself"
                    )
        self.code_verdicts[code] = verdict
        return verdict

    def tally(self, func, args: tuple, out: object) -> None:
        """Add one ATen operation's work (views and aliases compute nothing)."""
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in _NOT_WORK:
            return
        self.operations += 1
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for tensor in outputs:
            if isinstance(tensor, torch.Tensor):
                size = tensor.numel()
                self.elements += size
                self.largest = max(self.largest, size)
                if size > self.largest_tensor[0]:
                    self.largest_tensor = (size, tuple(tensor.shape), name)
        position = _PRODUCTS.get(name)
        if position is not None and len(args) > position + 1:
            a, b = args[position], args[position + 1]
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                self.multiply_adds += a.numel() * (b.shape[-1] if b.dim() >= 2 else 1)

    def started_by_trusted_code(self, frame: types.FrameType) -> bool:
        """Was this process started on behalf of code in one of ``rules.processes_from`` (the nearest
        caller outside the standard library, e.g. Triton's compiler calling ``subprocess.run``)?"""
        if not self.rules.processes_from:
            return False
        current: types.FrameType | None = frame
        while current is not None and _in_stdlib(current.f_code.co_filename):
            current = current.f_back
        return current is not None and current.f_code.co_filename.startswith(
            tuple(str(Path(d).resolve()) + os.sep for d in self.rules.processes_from)
        )

    # -- the profile hook -------------------------------------------------------------------------
    def profile(self, frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call":
            verdict = self.code_verdict(frame.f_code)
            if verdict:
                self.refuse(verdict)
        elif event == "c_call":
            if frame.f_code in self.own_codes or frame.f_code.co_filename == _THIS_FILE:
                return
            name = getattr(arg, "__name__", "") or ""
            module = getattr(arg, "__module__", None) or getattr(
                getattr(arg, "__self__", None), "__name__", ""
            )
            if name in _TAMPERING and module in ("sys", "threading", None, ""):
                self.refuse(
                    f"your function called {module or 'sys'}.{name}, which would switch the checker off"
                )
            if name in _ESCAPES and not self.started_by_trusted_code(frame):
                self.refuse(
                    f"your function called {name}: starting threads or processes is not allowed while a "
                    "checker runs (the work must happen in your function)"
                )
            reason = self.torch_name_forbidden(name) if name else None
            if reason and (module is None or "torch" in str(module) or module in ("", "builtins")):
                self.refuse(f"your function called {module + '.' if module else ''}{name}, {reason}")


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.watch.torch_calls += 1
        name = getattr(func, "__name__", "") or ""
        reason = self.watch.torch_name_forbidden(name) if name else None
        if reason:
            self.watch.refuse(f"your function called torch's {name}, {reason}")
        return func(*args, **(kwargs or {}))


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        reason = self.watch.torch_name_forbidden(name)
        if reason:
            self.watch.refuse(f"your function ran the ATen kernel {name}, {reason}")
        out = func(*args, **(kwargs or {}))
        self.watch.tally(func, args, out)
        return out


# ---------------------------------------------------------------------------------------------------
# Materialising results inside the guard, so nothing lazy escapes it.


def _plain(value: object, depth: int = 0) -> object:
    """A copy of ``value`` made only of plain tensors, numbers, strings, None, tuples and dicts."""
    if depth > 8:
        raise TypeError("the result is nested too deeply")
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"return a plain torch.Tensor, not a {type(value).__name__}")
        return value.detach().clone()
    if value is None or type(value) in (bool, int, float, str):
        return value
    # Subclasses are converted here, inside the guard, so their own code runs watched.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item, depth + 1) for key, item in value.items()}
    module = type(value).__module__
    if module == "numpy":
        import numpy as np

        if isinstance(value, np.ndarray):
            return torch.from_numpy(value.copy())
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
    raise TypeError(f"return tensors, numbers or tuples of them, not a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`ExerciseTimeout` in the main thread after ``seconds`` (no limit elsewhere)."""
    if (
        not seconds
        or threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "SIGALRM")
    ):
        yield
        return

    def on_alarm(signum, frame):
        raise ExerciseTimeout(f"ran longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def guarded_call(
    fn: Callable,
    args: Iterable = (),
    kwargs: dict | None = None,
    *,
    rules: Rules = Rules(),
    checker: str = "checker",
    time_limit: float | None = None,
    max_elements: int | None = None,
    counts: dict | None = None,
) -> object:
    """Call ``fn(*args, **kwargs)`` with the watchers on and return its result made plain.

    Raises :class:`Refused` when the call reached something forbidden (even if the reader's code
    caught the refusal), :class:`ExerciseTimeout` past ``time_limit`` seconds, :class:`TooLarge`
    when an ATen kernel produced a tensor of more than ``max_elements`` elements (views excluded);
    anything the reader's code raised propagates unchanged. ``counts``, a dict, receives
    ``"torch_calls"``: how many PyTorch functions and tensor methods the call made (a checker may limit
    them, e.g. to tell a log-depth scan from a loop over time steps).
    """
    _warm_up()
    watch = _Watch(rules, checker)
    still_ours = modes_intact = True
    previous_profile = sys.getprofile()
    previous_thread_profile = threading.getprofile() if hasattr(threading, "getprofile") else None
    function_mode, dispatch_mode = _FunctionWatch(watch), _DispatchWatch(watch)
    result: object = None
    error: BaseException | None = None
    calls = 0
    with _time_limit(time_limit):
        with function_mode, dispatch_mode:
            hook = watch.profile
            threading.setprofile(hook)
            sys.setprofile(hook)
            try:
                value = fn(*tuple(args), **(kwargs or {}))
                calls = watch.torch_calls  # the reader's calls, not those that copy the result below
                result = _plain(value)
            except BaseException as raised:  # noqa: BLE001 - re-raised below, after the checks
                error = raised
            finally:
                still_ours = sys.getprofile() is hook
                sys.setprofile(previous_profile)
                threading.setprofile(previous_thread_profile)
                modes_intact = _mode_on_stack(function_mode) and _dispatch_on_stack(dispatch_mode)
    global _LAST_WORK
    _LAST_WORK = Work(watch.largest, watch.elements, watch.multiply_adds, watch.operations)
    if counts is not None:
        counts["torch_calls"] = calls if error is None else watch.torch_calls
    if watch.violation is not None:
        raise Refused(watch.violation)
    if isinstance(error, ExerciseTimeout):
        raise error
    if not still_ours or not modes_intact:
        raise Refused(
            "your function switched the checker's watchers off; it must not touch the profiler or modes"
        )
    if error is not None:
        raise error
    if max_elements is not None and watch.largest_tensor[0] > max_elements:
        raise TooLarge(*watch.largest_tensor, max_elements)
    return result


_LAST_WORK = Work()


def last_work() -> Work:
    """The :class:`Work` of the latest guarded call (the reader's function, nothing of the checker's)."""
    return _LAST_WORK


_WARM = False


def _warm_up() -> None:
    """Pay the one-time costs outside the reader's time limit: the first dispatch mode imports
    torch._dynamo (seconds), and the library's fingerprints are indexed."""
    global _WARM
    _library_fingerprints()
    if not _WARM:
        with _DispatchWatch(_Watch(Rules(), "warm-up")):
            torch.zeros(1).add_(0)
        _WARM = True


def _mode_on_stack(mode: TorchFunctionMode) -> bool:
    try:
        from torch.overrides import _get_current_function_mode_stack

        return any(m is mode for m in _get_current_function_mode_stack())
    except ImportError:  # pragma: no cover - older torch
        return True


def _dispatch_on_stack(mode: TorchDispatchMode) -> bool:
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

        return any(m is mode for m in _get_current_dispatch_mode_stack())
    except ImportError:  # pragma: no cover - older torch
        return True
