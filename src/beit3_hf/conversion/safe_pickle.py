"""Read a whole pickled torch module (`torch.save(module, path)`) without running any code from the file.

OpenAI's DALL-E dVAE `encoder.pkl` is a pickled `dall_e.encoder.Encoder`: loading it with `torch.load` imports
`dall_e` and calls whatever the pickle names, which is arbitrary code execution for an untrusted file, and
`torch.load(weights_only=True)` refuses it. This module reads such a file with a restricted unpickler instead:

- every global the pickle names (a class such as `dall_e.encoder.Encoder`, `torch.nn.Conv2d`,
  `collections.OrderedDict`, or a function such as `os.system`) is replaced by an inert *recorder* class: calling or
  instantiating it only records the arguments, `__setstate__` (the BUILD opcode) only records the state, and item
  assignments only record the items. Nothing is imported and none of the named code runs;
- the only real functions it hands to the pickle are its own tensor rebuilders, for torch's
  `_rebuild_tensor_v2` / `_rebuild_parameter` family, and storage-type markers for `torch.FloatStorage` & co. They
  check their arguments and produce tensors from the file's raw storage bytes;
- afterwards, `read_pickled_module` walks the recorded module tree (`_parameters`, `_buffers`, `_modules` of each
  recorded `nn.Module` state) and returns the parameters as plain tensors with their state-dict names, the class
  name and the plain attributes of every module. Anything else where a tensor or a container should be is refused.

Both `torch.save` formats are read: the zip format (torch >= 1.6, `data.pkl` + `data/<key>` records, read with
`zipfile`) and the legacy format (`_use_new_zipfile_serialization=False`: magic number, protocol, system info, the
object, the storage keys, then the raw storages). The pre-1.0 tar format is refused. There is no option that relaxes
any of this.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

# torch.serialization.MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}


class UnsafePickleError(ValueError):
    """The file is not a pickled module made only of tensors, plain containers and recorded objects."""


# ----------------------------------------------------------------------------------------------------------------------
# Inert stand-ins handed to the pickle
# ----------------------------------------------------------------------------------------------------------------------


class RecordedObject:
    """Stand-in for an object of a class (or the result of a call to a function) that a pickle names.

    Creating, calling or building it runs none of the named code: the arguments, the `__setstate__` state and the
    items/elements the pickle adds are stored as they are.

    Example:

    ```python
    >>> import io, os, pickle
    >>> from beit3_hf.conversion.safe_pickle import RestrictedUnpickler
    >>> class Payload:
    ...     def __reduce__(self):
    ...         return (os.system, ("echo this never runs",))
    >>> recorded = RestrictedUnpickler(io.BytesIO(pickle.dumps(Payload()))).load()
    >>> recorded, recorded._pickle_args
    (<recorded posix.system>, ('echo this never runs',))

    ```
    """

    qualname: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> RecordedObject:
        obj = object.__new__(cls)
        obj.__dict__.update(_pickle_args=args, _pickle_kwargs=kwargs, _pickle_state=None, _pickle_items={})
        obj.__dict__["_pickle_list"] = []
        return obj

    def __setstate__(self, state: Any) -> None:  # the BUILD opcode
        self.__dict__["_pickle_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S), e.g. the items of an OrderedDict
        self.__dict__["_pickle_items"][key] = value

    def append(self, value: Any) -> None:  # APPEND(S)
        self.__dict__["_pickle_list"].append(value)

    def extend(self, values: Any) -> None:
        self.__dict__["_pickle_list"].extend(values)

    def __repr__(self) -> str:
        return f"<recorded {self.qualname}>"


class _Sealed:
    """This module's own objects: the pickle's BUILD opcode must not set their attributes."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"the pickle tries to set the state of a {type(self).__name__}: refused")


class _StorageType(_Sealed):
    """Marker for `torch.FloatStorage` & co.: only its dtype is used."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type torch.{self.name}>"


class _Storage(_Sealed):
    """A storage of the file: its bytes are filled in by the reader (zip: right away; legacy: after the pickle)."""

    __slots__ = ("data", "dtype", "key", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: torch.Tensor | None = None  # 1-D, `numel` elements of `dtype`

    def fill(self, raw: bytes) -> None:
        if len(raw) != self.numel * self.dtype.itemsize:
            raise UnsafePickleError(
                f"storage {self.key!r}: {len(raw)} bytes in the file, {self.numel * self.dtype.itemsize} expected"
            )
        self.data = torch.frombuffer(bytearray(raw), dtype=self.dtype) if raw else torch.empty(0, dtype=self.dtype)

    def flat(self) -> torch.Tensor:
        if self.data is None:
            raise UnsafePickleError(f"storage {self.key!r} has no data in the file")
        return self.data


class _StorageView(_Sealed):
    """A view into a storage (legacy format `view_metadata`)."""

    __slots__ = ("offset", "root", "size")

    def __init__(self, root: _Storage, offset: int, size: int) -> None:
        self.root, self.offset, self.size = root, offset, size

    def flat(self) -> torch.Tensor:
        return self.root.flat()[self.offset : self.offset + self.size]


class _PendingTensor(_Sealed):
    """A tensor whose storage may not be read yet; `materialize()` returns a new, compact tensor."""

    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage: _Storage | _StorageView, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> torch.Tensor:
        flat = self.storage.flat()
        try:
            view = torch.as_strided(flat, self.size, self.stride, self.offset)
        except RuntimeError as error:
            raise UnsafePickleError(f"tensor of size {self.size} does not fit its storage: {error}") from None
        return view.clone(memory_format=torch.contiguous_format)


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsafePickleError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise UnsafePickleError(f"{what} must be a tuple of integers, got {value!r}")
    return tuple(_int(item, what) for item in value)


def _check_no_hooks(hooks: Any) -> None:
    empty = (isinstance(hooks, dict) and not hooks) or (
        isinstance(hooks, RecordedObject)
        and hooks.qualname == "collections.OrderedDict"
        and not hooks._pickle_args
        and not hooks._pickle_items
    )
    if not empty:
        raise UnsafePickleError(f"tensor with backward hooks {hooks!r}: refused")


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _PendingTensor:
    if not isinstance(storage, (_Storage, _StorageView)):
        raise UnsafePickleError(f"tensor rebuilt from {storage!r}, not from a storage of the file")
    return _PendingTensor(
        storage, _int(storage_offset, "storage offset"), _int_tuple(size, "size"), _int_tuple(stride, "stride")
    )


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> _PendingTensor:
    _check_no_hooks(backward_hooks)
    if metadata:
        raise UnsafePickleError(f"tensor with metadata {metadata!r}: refused")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> _PendingTensor:
    if not isinstance(data, _PendingTensor):
        raise UnsafePickleError(f"parameter rebuilt from {data!r}, not from a tensor")
    _check_no_hooks(backward_hooks)
    return data


class _SafeFunction(_Sealed):
    """One of this module's functions as handed to the pickle: callable, but its attributes cannot be set."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<safe {self.function.__name__}>"


_SAFE_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter)
_PLAIN_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _PendingTensor:
    function = func.function if isinstance(func, _SafeFunction) else None
    if function not in _SAFE_REBUILDERS or getattr(new_type, "qualname", None) not in _PLAIN_TENSOR_TYPES:
        raise UnsafePickleError(f"tensor subclass {getattr(new_type, 'qualname', new_type)!r}: refused")
    if not isinstance(args, tuple):
        raise UnsafePickleError(f"tensor arguments {args!r}: refused")
    return function(*args)


def _size(values: Any) -> tuple[int, ...]:  # torch.Size
    return _int_tuple(values, "torch.Size")


def _reconstructor(cls: Any, base: Any, state: Any) -> RecordedObject:  # copyreg._reconstructor (protocols 0 and 1)
    if not (isinstance(cls, type) and issubclass(cls, RecordedObject)):
        raise UnsafePickleError(f"copyreg._reconstructor of {cls!r}: refused")
    return cls.__new__(cls)


_SAFE_GLOBALS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": _size,
    "copyreg._reconstructor": _reconstructor,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals are recorders, storage markers and this module's tensor rebuilders only.

    `persistent_load` turns torch's storage references into `_Storage` objects (one per key, registered in
    `self.storages`); the legacy format's class references (`("module", cls, file, source)`) resolve to their
    recorder class. Use `read_pickled_module` for whole files; see `RecordedObject` for an example.
    """

    def __init__(self, file: io.BufferedIOBase, legacy: bool = False) -> None:
        super().__init__(file)
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}
        self.views: dict[str, _StorageView] = {}
        self.recorder_classes: dict[str, type[RecordedObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (torch.save writes protocol 2), mapped as the default unpickler's fix_imports would, without
        # importing anything.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualname = f"{module}.{name}"
        if qualname in _SAFE_GLOBALS:
            return _SafeFunction(_SAFE_GLOBALS[qualname])
        if module in ("torch", "torch.storage", "torch.cuda") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if qualname not in self.recorder_classes:
            self.recorder_classes[qualname] = type("RecordedObject", (RecordedObject,), {"qualname": qualname})
        return self.recorder_classes[qualname]

    def persistent_load(self, saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or not saved_id:
            raise UnsafePickleError(f"unknown persistent id {saved_id!r}")
        kind = saved_id[0].decode("ascii") if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module" and self.legacy and len(saved_id) == 4:
            cls = saved_id[1]
            if not (isinstance(cls, type) and issubclass(cls, RecordedObject)):
                raise UnsafePickleError(f"class reference {cls!r}: refused")
            return cls
        if kind != "storage":
            raise UnsafePickleError(f"unknown persistent id kind {kind!r}")
        if self.legacy:
            if len(saved_id) != 6:
                raise UnsafePickleError(f"malformed storage reference {saved_id!r}")
            storage_type, key, _location, numel, view_metadata = saved_id[1:]
        else:
            if len(saved_id) != 5:
                raise UnsafePickleError(f"malformed storage reference {saved_id!r}")
            storage_type, key, _location, numel = saved_id[1:]
            view_metadata = None
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"storage of type {storage_type!r}: refused")
        key = str(key)
        numel = _int(numel, "storage size")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        if view_metadata is None:
            return storage
        view_key, offset, size = view_metadata
        view_key = str(view_key)
        if view_key not in self.views:
            self.views[view_key] = _StorageView(storage, _int(offset, "view offset"), _int(size, "view size"))
        return self.views[view_key]


# ----------------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------------


def _unpickle(unpickler: RestrictedUnpickler, where: str) -> Any:
    try:
        return unpickler.load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{where}: {error}") from None
    except Exception as error:  # malformed or truncated pickle, refused construct (e.g. a non-callable REDUCE)
        raise UnsafePickleError(f"{where}: cannot be read safely ({type(error).__name__}: {error})") from None


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafePickleError(f"{path} is a zip archive but not a torch.save file (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise UnsafePickleError(f"{path} was saved on a big-endian machine; not supported")
        unpickler = RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])))
        root = _unpickle(unpickler, str(path))
        for key, storage in unpickler.storages.items():
            try:
                storage.fill(archive.read(f"{prefix}data/{key}"))
            except KeyError:
                raise UnsafePickleError(f"{path}: storage {key!r} is missing from the archive") from None
    return root


def _load_legacy(path: Path) -> Any:
    with open(path, "rb") as file:
        magic = _unpickle(RestrictedUnpickler(file, legacy=True), str(path))
        if not (isinstance(magic, int) and magic == _LEGACY_MAGIC_NUMBER):
            raise UnsafePickleError(
                f"{path} is not a file written by torch.save: neither a zip archive nor the legacy format (its first "
                f"pickle is {magic!r}, not torch's magic number)"
            )
        protocol = _unpickle(RestrictedUnpickler(file, legacy=True), str(path))
        if protocol != _LEGACY_PROTOCOL_VERSION:
            raise UnsafePickleError(f"{path}: unsupported legacy protocol version {protocol!r}")
        sys_info = _unpickle(RestrictedUnpickler(file, legacy=True), str(path))
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise UnsafePickleError(f"{path}: saved on a big-endian machine or without system info; not supported")
        unpickler = RestrictedUnpickler(file, legacy=True)
        root = _unpickle(unpickler, str(path))
        keys = _unpickle(RestrictedUnpickler(file, legacy=True), str(path))
        if not isinstance(keys, list) or {str(key) for key in keys} != set(unpickler.storages):
            raise UnsafePickleError(f"{path}: the storage list does not match the storages the object uses")
        for key in keys:
            storage = unpickler.storages[str(key)]
            header = file.read(8)
            if len(header) != 8:
                raise UnsafePickleError(f"{path}: truncated at storage {key!r}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise UnsafePickleError(f"{path}: storage {key!r} has {numel} elements, {storage.numel} expected")
            storage.fill(file.read(numel * storage.dtype.itemsize))
    return root


def load_restricted(path: str | Path) -> Any:
    """Unpickle a `torch.save` file (zip or legacy format) with recorders for every named global.

    Returns the recorded root object; its tensors are `_PendingTensor`s (see `read_pickled_module`). Raises
    `UnsafePickleError` for anything that is not a readable `torch.save` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    if tarfile.is_tarfile(path):
        raise UnsafePickleError(f"{path} is in the tar format of torch < 0.4; not supported")
    return _load_legacy(path)


# ----------------------------------------------------------------------------------------------------------------------
# The recorded module tree
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PickledModule:
    """One `nn.Module` of the pickle: its class name, plain attributes, own tensors and child modules.

    Example:

    ```python
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from beit3_hf.conversion.safe_pickle import read_pickled_module
    >>> path = Path(tempfile.mkdtemp()) / "module.pkl"
    >>> torch.save(torch.nn.Sequential(torch.nn.Linear(2, 3)), path)
    >>> module = read_pickled_module(path)  # no code from the file runs
    >>> module.class_name, {name: tuple(t.shape) for name, t in module.state_dict().items()}
    ('torch.nn.modules.container.Sequential', {'0.weight': (3, 2), '0.bias': (3,)})
    >>> module.children["0"].attributes["in_features"]
    2

    ```
    """

    class_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    children: dict[str, PickledModule] = field(default_factory=dict)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat `{"blocks.group_1.block_1.res_path.conv_1.w": tensor, ...}` as `module.state_dict()` names it."""
        out = {f"{prefix}{name}": tensor for name, tensor in self.tensors.items()}
        for name, child in self.children.items():
            out.update(child.state_dict(f"{prefix}{name}."))
        return out

    def modules(self, prefix: str = "") -> dict[str, PickledModule]:
        """Every module by its dotted path ("" for the root)."""
        out = {prefix.rstrip("."): self}
        for name, child in self.children.items():
            out.update(child.modules(f"{prefix}{name}."))
        return out


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, RecordedObject) else type(value).__name__


def _mapping(value: Any, where: str) -> dict:
    if isinstance(value, dict):
        return value
    if isinstance(value, RecordedObject) and value.qualname == "collections.OrderedDict" and not value._pickle_args:
        return value._pickle_items
    raise UnsafePickleError(f"{where} is a {_describe(value)}, not a dict")


def _name_set(value: Any, where: str) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, (set, frozenset)):
        return set(value)
    if isinstance(value, RecordedObject) and value.qualname in ("builtins.set", "builtins.frozenset"):
        args = value._pickle_args
        if not args:
            return set()
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return set(args[0])
    raise UnsafePickleError(f"{where} is a {_describe(value)}, not a set of names")


_PLAIN = (bool, int, float, str, type(None))


def _walk(obj: Any, where: str, ancestors: frozenset[int] = frozenset()) -> PickledModule:
    if not isinstance(obj, RecordedObject) or not isinstance(obj._pickle_state, dict):
        raise UnsafePickleError(f"{where} is a {_describe(obj)}, not a pickled nn.Module")
    if id(obj) in ancestors:
        raise UnsafePickleError(f"{where} contains itself: the module tree has a cycle")
    ancestors = ancestors | {id(obj)}
    state = obj._pickle_state
    module = PickledModule(obj.qualname)
    module.attributes = {key: value for key, value in state.items() if isinstance(value, _PLAIN)}
    non_persistent = _name_set(state.get("_non_persistent_buffers_set"), f"{where}._non_persistent_buffers_set")
    for group in ("_parameters", "_buffers"):
        for name, value in _mapping(state.get(group, {}), f"{where}.{group}").items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, _PendingTensor):
                raise UnsafePickleError(f"{where}.{name} is a {_describe(value)}, not a tensor")
            module.tensors[str(name)] = value.materialize()
    for name, child in _mapping(state.get("_modules", {}), f"{where}._modules").items():
        if child is not None:
            module.children[str(name)] = _walk(child, f"{where}.{name}", ancestors)
    return module


def read_pickled_module(path: str | Path) -> PickledModule:
    """Read a `torch.save(module)` file without running any of its code; see the module docstring.

    Raises `UnsafePickleError` when the file is not a pickled module made of tensors, plain containers and recorded
    objects (e.g. a pickle that calls `os.system`: the call is recorded, never made, and refused here).
    """
    root = load_restricted(path)
    return _walk(root, "<root>")
