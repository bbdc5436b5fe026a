"""A package's names loaded on first use (PEP 562), not when the package is imported.

``mnn`` and ``mnn.distributed`` list their public names with the module each comes
from, and load that module when a name is first asked for. So importing a light
part of the package (the launcher, or the console scripts while they hold Ctrl-C,
SIGTERM and SIGHUP before anything heavy loads) does not load NumPy and the layers.

Usage, at the end of a package's ``__init__.py``::

    _SOURCES = {"SequentialLayers": "mnn.seq_layers", ...}
    __all__ = list(_SOURCES)
    __getattr__, __dir__ = lazy_names(__name__, _SOURCES, globals())
"""
import importlib
from typing import Any, Callable

__all__ = ["lazy_names"]


def lazy_names(package: str, sources: dict[str, str],
               namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``, whose names
    ``sources`` maps to the modules that define them; a name once loaded is kept in
    ``namespace`` (the package's globals), so it is looked up once."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name]), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *sources})

    return __getattr__, __dir__
