"""Read a torchxrayvision weights file as data: tensors come out, no code runs.

torchxrayvision publishes each DenseNet as a whole pickled module (its training script
calls ``torch.save(model, ...)``) and loads it with ``torch.load(weights_only=False)``: a
pickle saved under the weights' file name in the cache folder would run any command as
the user. This module unpickles such files through a restricted
unpickler instead, and hands back only the tensors, by their ``state_dict`` names.

Why not PyTorch's own weights-only unpickler (``torch.serialization.safe_globals``):

- it refuses the format the published files use: they were written by PyTorch before 1.6
  (torchxrayvision patches their missing ``_non_persistent_buffers_set``, pytorch issue
  42242), whose legacy format names each module class in a ``('module', ...)``
  persistent id, and the weights-only unpickler accepts only storage persistent ids;
- an allow-listed class may be *called* as well as rebuilt (the ``REDUCE`` opcode), and
  calling ``DenseNet(weights=..., cache_dir=...)`` makes torchxrayvision
  ``torch.load(weights_only=False)`` a second file of the attacker's choosing.

So the rules here are stricter, opcode by opcode, on the standard library's pure-Python
unpickler: module classes (exactly those a torchxrayvision DenseNet is made of) may only
be rebuilt empty and filled with state (``NEWOBJ`` + ``BUILD``), never called; the only
callables are PyTorch's tensor rebuild functions and the containers; ``INST``/``OBJ``
(protocol 0/1 calls) are refused. The loaded object's methods are never called: its
tensors are read from the module tree's ``__dict__``, checked, and copied into a freshly
built ``xrv.models.DenseNet`` (:mod:`cxrsr.model.classifier`).

torchxrayvision's ResNet-50 weights are published differently: as a ``state_dict`` (an
``OrderedDict`` of tensors, ``torch.save(model.state_dict())``), which torchxrayvision
loads into a freshly built torchvision ResNet. Such a pickle needs no module class at
all, so the allow-list grows by nothing for it: :func:`load_state_dict` with
``form=STATE_DICT`` accepts a top-level mapping of names to tensors instead of a
DenseNet module, under the same opcode rules (a module inside it is refused).

Where the file comes from: torchxrayvision's GitHub release, unless the setting
``CXRSR_WEIGHTS_BASE_URL`` (environment, then ``.env``) names another base URL, such as a
mirror inside a hospital network or the tests' local server; the published file name
is appended to it. The file is checked as above whatever served it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import io
import pickle
import posixpath
import types
import warnings
from pathlib import Path
from typing import Any, ClassVar

from cxrsr.errors import PipelineError

#: Module classes a torchxrayvision DenseNet is made of, by their pickled names.
DENSENET_CLASSES = (
    "torchxrayvision.models.DenseNet",
    "torchxrayvision.models._DenseBlock",
    "torchxrayvision.models._DenseLayer",
    "torchxrayvision.models._Transition",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.batchnorm.BatchNorm2d",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.pooling.AvgPool2d",
    "torch.nn.modules.linear.Linear",
)

#: Functions and containers a pickle may call: tensor rebuilding and plain containers.
#: (Storage classes never reach here: torch.load maps them to its own storage types.)
CALLABLES = (
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "collections.OrderedDict",
    "builtins.set",
)


#: How a weights file holds its tensors: a pickled DenseNet module, or a ``state_dict``.
PICKLED_MODULE, STATE_DICT = "module", "state_dict"


class WeightsRefused(PipelineError):
    """A weights file that is not plain torchxrayvision weights (exit 3)."""

    exit_code = 3


@functools.cache
def _resolve(name: str) -> Any:
    import importlib

    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


@functools.cache
def _module_classes() -> dict[str, type]:
    return {name: _resolve(name) for name in DENSENET_CLASSES}


@functools.cache
def _callables() -> dict[str, Any]:
    return {name: _resolve(name) for name in CALLABLES}


def _buildable() -> tuple[type, ...]:
    import torch

    return (*_module_classes().values(), collections.OrderedDict, torch.Tensor, torch.nn.Parameter)


class _RestrictedUnpickler(pickle._Unpickler):
    """The standard library's pure-Python unpickler with its risky opcodes narrowed.

    Its ``dispatch`` table maps each opcode to a method, so each rule below replaces
    exactly one opcode's handler.
    """

    stack: list[Any]
    proto: int
    fix_imports: bool
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, as pickle.find_class maps them
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        found = _module_classes().get(full) or _callables().get(full)
        if found is None:
            raise pickle.UnpicklingError(f"it names {full}, which torchxrayvision weights never do")
        return found

    def _load_reduce(self) -> None:
        func = self.stack[-2]
        if not any(func is allowed for allowed in _callables().values()):
            raise pickle.UnpicklingError(f"it calls {_name_of(func)}, which weights never do")
        pickle._Unpickler.load_reduce(self)  # type: ignore[attr-defined]

    def _load_newobj(self) -> None:
        self._check_class(self.stack[-2])
        pickle._Unpickler.load_newobj(self)  # type: ignore[attr-defined]

    def _load_newobj_ex(self) -> None:
        self._check_class(self.stack[-3])
        pickle._Unpickler.load_newobj_ex(self)  # type: ignore[attr-defined]

    def _check_class(self, cls: Any) -> None:
        allowed = (*_module_classes().values(), collections.OrderedDict)
        if not any(cls is c for c in allowed):
            raise pickle.UnpicklingError(f"it creates {_name_of(cls)}, which weights never do")

    def _load_build(self) -> None:
        instance = self.stack[-2]
        if type(instance) not in _buildable():
            raise pickle.UnpicklingError(
                f"it sets the state of {_name_of(type(instance))}, which weights never do"
            )
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    def _refuse_call(self) -> None:
        raise pickle.UnpicklingError("it uses a protocol 0/1 class call (INST/OBJ)")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.INST[0]] = _refuse_call
    dispatch[pickle.OBJ[0]] = _refuse_call


def _name_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    return f"{module}.{name}" if module else str(name)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


#: What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load``.
RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler, load=_restricted_load, __name__="cxrsr.model.weights"
)


#: The setting that replaces the GitHub release's base URL of the weights files.
WEIGHTS_BASE_URL = "CXRSR_WEIGHTS_BASE_URL"


def weights_url(published: str) -> str:
    """The URL to fetch a weights file from: ``published`` (torchxrayvision's), or the
    same file name under :data:`WEIGHTS_BASE_URL` when that setting is not empty."""
    from cxrsr.config import setting

    base = (setting(WEIGHTS_BASE_URL) or "").strip()
    if not base:
        return published
    return f"{base.rstrip('/')}/{posixpath.basename(published)}"


def download_weights(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with torchxrayvision's own downloader, which writes
    ``path`` only once the transfer is complete and raises on an HTTP error status."""
    import torchxrayvision as xrv

    path.parent.mkdir(parents=True, exist_ok=True)
    # torchxrayvision prints a progress bar; keep stdout for the scripts' summaries.
    with contextlib.redirect_stdout(io.StringIO()):
        xrv.utils.download(url, str(path))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_weights_bytes(path: Path, expected_sha256: str | None = None) -> tuple[bytes, str]:
    """The file's bytes and their SHA-256, checked against ``expected_sha256`` if given.

    The bytes are read once and both hashed and unpickled from memory, so the file
    cannot change between the check and the load.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PipelineError(f"weights file {path}: cannot read: {exc.strerror or exc}", 3) from exc
    digest = sha256_hex(data)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise WeightsRefused(
            f"weights file {path}: SHA-256 {digest} does not match --weights-sha256 "
            f"{expected_sha256.lower()}; not loaded"
        )
    return data, digest


def load_state_dict(data: bytes, path: Path, form: str = PICKLED_MODULE) -> dict[str, Any]:
    """The tensors of a torchxrayvision weights file, by ``state_dict`` name.

    ``form``: :data:`PICKLED_MODULE` (the DenseNets: a whole pickled DenseNet) or
    :data:`STATE_DICT` (the ResNets: a mapping of names to tensors). Raises
    :class:`WeightsRefused` (one line, naming ``path``) for anything else.
    """
    import torch

    kind = "DenseNet" if form == PICKLED_MODULE else "ResNet state_dict"
    try:
        with warnings.catch_warnings():
            # Legacy files carry their classes' source; a changed source only warns.
            warnings.simplefilter("ignore")
            loaded = torch.load(
                io.BytesIO(data),
                map_location="cpu",
                pickle_module=RESTRICTED_PICKLE,
                weights_only=False,  # the restricted unpickler above replaces pickle
            )
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsRefused(
            f"weights file {path} refused: {detail} (not a torchxrayvision {kind} weights "
            "file; delete it and rerun to download it again)"
        ) from exc
    if form == STATE_DICT:
        return _plain_tensors(loaded, path)
    densenet = _module_classes()["torchxrayvision.models.DenseNet"]
    if type(loaded) is not densenet:
        raise WeightsRefused(
            f"weights file {path} refused: it holds {_name_of(type(loaded))}, "
            "not a torchxrayvision DenseNet"
        )
    tensors: dict[str, Any] = {}
    _collect_tensors(loaded, "", tensors, path, depth=0)
    return tensors


def _plain_tensors(loaded: Any, path: Path) -> dict[str, Any]:
    """A ``state_dict``'s tensors: a mapping of string names to tensors, nothing else."""
    import torch

    if type(loaded) is not collections.OrderedDict and type(loaded) is not dict:
        raise WeightsRefused(
            f"weights file {path} refused: it holds {_name_of(type(loaded))}, not a state_dict"
        )
    tensors: dict[str, Any] = {}
    for name, value in loaded.items():
        if not isinstance(name, str) or type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise WeightsRefused(
                f"weights file {path} refused: it holds {_name_of(type(value))} as {name!r}"
            )
        tensors[name] = value.detach()
    return tensors


def _collect_tensors(module: Any, prefix: str, out: dict[str, Any], path: Path, depth: int) -> None:
    """``state_dict`` without calling the object: parameters, persistent buffers, children."""
    import torch

    def refuse(what: str) -> WeightsRefused:
        return WeightsRefused(f"weights file {path} refused: {prefix or 'the model'} {what}")

    if type(module) not in _module_classes().values() or depth > 8:
        raise refuse(f"holds {_name_of(type(module))} where a layer belongs")
    state = vars(module)
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        members = state.get(group, {})
        if type(members) is not collections.OrderedDict and type(members) is not dict:
            raise refuse(f"has a {group} that is not a dictionary")
        for name, value in members.items():
            if value is None or (group == "_buffers" and name in skip):
                continue
            if type(value) not in (torch.Tensor, torch.nn.Parameter) or not isinstance(name, str):
                raise refuse(f"holds {_name_of(type(value))} as {name!r}")
            out[prefix + name] = value.detach()
    children = state.get("_modules", {})
    if type(children) is not collections.OrderedDict and type(children) is not dict:
        raise refuse("has a _modules that is not a dictionary")
    for name, child in children.items():
        if child is not None:
            _collect_tensors(child, f"{prefix}{name}.", out, path, depth + 1)
