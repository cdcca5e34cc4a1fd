"""A griffe extension for the API reference: the names a package loads on first use.

``foxpoll.dedup``, ``foxpoll.events``, ``foxpoll.recovery`` and ``foxpoll.testing`` export
some names through a module ``__getattr__``, so that an optional extra is imported only
when its backend is used. Static analysis cannot follow that, and the reference would have
to name those classes by the module that defines them. For each name of a package's
``__all__`` it does not find, this adds an alias to the one submodule of the package that
defines it, so ``::: foxpoll.dedup.PostgresDedupStore`` documents it where users import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import griffe


class LazyExports(griffe.Extension):
    """Aliases for the names of ``__all__`` that a package's ``__getattr__`` provides."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader,
                   **kwargs: Any) -> None:
        for package in _packages(pkg):
            for export in package.exports or ():
                name = str(export)
                if name in package.members:
                    continue
                # Two submodules defining the name would make the alias a guess: refuse.
                defining = [module for module in package.modules.values()
                            if name in module.members and not module.members[name].is_alias]
                if len(defining) != 1:
                    raise ValueError(f"{package.path}.{name} is in __all__ but defined in "
                                     f"{len(defining)} of its submodules, not one")
                package.set_member(name, griffe.Alias(name, defining[0].members[name],
                                                      parent=package))


def _packages(module: griffe.Module) -> Iterator[griffe.Module]:
    if module.is_init_module:
        yield module
        for submodule in module.modules.values():
            yield from _packages(submodule)
