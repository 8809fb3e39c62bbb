"""Registries of the parts a config names (estimators, policies), and plug-in loading.

A registry is the single source of a kind's names: Hydra's config store, :func:`lai.config.
validate`, the public API, the runner and the data-parallel checks all ask it. Each entry
owns a typed options dataclass: its fields are the config keys of that part
(``estimator.<key>``, ``policy.<key>``), so a key of another part fails when Hydra
composes the config, and the dataclass's ``__post_init__`` checks the values.

Plug-ins outside this package register themselves when imported. :func:`load_plugins`
imports the modules named in ``$LAI_PLUGINS`` (comma-separated) and those declared under
the ``lai.plugins`` entry-point group of installed packages; ``run.py`` calls it before
Hydra composes the config. See ``docs/extending.md``.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, Generic, Iterator, Optional, Tuple, TypeVar

T = TypeVar("T")

PLUGIN_ENV = "LAI_PLUGINS"
ENTRY_POINT_GROUP = "lai.plugins"


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part: ``build(options) -> T``; ``options`` a dataclass type whose
    ``name`` field defaults to ``name``; ``kind`` a sub-kind (estimators: ``online`` or
    ``static``); ``meta`` what the kind's code reads besides (e.g. a static estimator's
    function of the public API)."""

    name: str
    options: type
    build: Callable[..., T]
    kind: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names -> :class:`Entry` for one kind of part (``what``: "estimator", "policy")."""

    def __init__(self, what: str, kinds: Tuple[str, ...] = ("",)):
        self.what, self.kinds = what, kinds
        self._entries: Dict[str, Entry[T]] = {}

    def register(self, name: str, options: type, *, kind: str = "",
                 **meta: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register ``build(options) -> T`` under ``name``. Registering a name
        twice is a ValueError unless it is the same function (a module imported again)."""
        if kind not in self.kinds:
            raise ValueError(f"{self.what} kind {kind!r} is not one of: {', '.join(self.kinds)}")
        if not dataclasses.is_dataclass(options) or "name" not in {
                f.name for f in dataclasses.fields(options)}:
            raise TypeError(f"{self.what} {name!r}: options must be a dataclass with a "
                            "'name' field")

        def add(build: Callable[..., T]) -> Callable[..., T]:
            old = self._entries.get(name)
            same = old is not None and (old.build.__module__, old.build.__qualname__) == (
                build.__module__, build.__qualname__)  # the module imported again
            if old is not None and not same:
                raise ValueError(f"{self.what} {name!r} is registered already "
                                 f"(by {old.build.__module__})")
            self._entries[name] = Entry(name, options, build, kind, dict(meta))
            return build

        return add

    def names(self, kind: Optional[str] = None) -> Tuple[str, ...]:
        """The registered names (of ``kind`` only, when given), sorted."""
        return tuple(sorted(n for n, e in self._entries.items()
                            if kind is None or e.kind == kind))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter([self._entries[n] for n in self.names()])

    def get(self, name: str) -> Entry[T]:
        """The entry ``name``; a one-line ValueError listing the known names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; known: "
                             f"{', '.join(self.names())}") from None

    def options(self, name: str, **values: Any) -> Any:
        """The options dataclass of ``name`` filled from ``values`` (the rest default).
        A key the entry does not have is a TypeError naming it; a bad value a ValueError
        (from the dataclass's own checks)."""
        entry = self.get(name)
        known = {f.name for f in dataclasses.fields(entry.options)} - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"{self.what} {name!r} has no option(s) {', '.join(unknown)}; "
                            f"its options: {', '.join(sorted(known)) or 'none'}")
        return entry.options(name=name, **values)

    def build(self, options: Any) -> T:
        """The part ``options`` (an instance of an entry's options dataclass) describes."""
        entry = self.get(options.name)
        if not isinstance(options, entry.options):
            raise TypeError(f"{self.what} {options.name!r} takes {entry.options.__name__}, "
                            f"got {type(options).__name__}")
        return entry.build(options)


def options_from_config(node: Any, registry: Registry) -> Any:
    """The options dataclass instance a composed config node (``cfg.estimator``,
    ``cfg.policy``), a mapping with a ``name``, or an options instance describes, filled
    through :meth:`Registry.options` (so a key the entry does not have, e.g. one added with
    Hydra's ``+key=value``, is a TypeError, and ``__post_init__`` checks the values)."""
    from omegaconf import DictConfig, OmegaConf

    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return node
    values = dict(OmegaConf.to_container(node) if isinstance(node, DictConfig) else node)
    return registry.options(values.pop("name"), **values)


def import_submodules(package: str) -> None:
    """Import every module of ``package`` and of its sub-packages (a built-in estimator,
    policy or dataset registers itself in its own module: adding one is adding a file)."""
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


_loaded: set = set()


def load_plugins(modules: Optional[str] = None) -> list:
    """Import the plug-in modules named in ``modules`` (comma-separated; default
    ``$LAI_PLUGINS``) and the ``lai.plugins`` entry points; returns the modules imported
    now. A module that fails to import raises ImportError naming where it was listed."""
    names = [m.strip() for m in (os.environ.get(PLUGIN_ENV, "") if modules is None
                                 else modules).split(",") if m.strip()]
    done = []
    for name in names:
        if name in _loaded:
            continue
        try:
            done.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(f"plug-in {name!r} (from ${PLUGIN_ENV}) does not import: "
                              f"{e}") from e
        _loaded.add(name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _loaded:
            done.append(ep.load())
            _loaded.add(ep.value)
    return done
