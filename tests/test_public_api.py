"""The public surface: sorted exports, and sync/async twins that stay in step."""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

import foxpoll
from foxpoll import _resources


@pytest.mark.parametrize("module", ["foxpoll", "foxpoll.backoff", "foxpoll.dedup",
                                    "foxpoll.delivery", "foxpoll.errors", "foxpoll.events",
                                    "foxpoll.metrics", "foxpoll.models", "foxpoll.recovery",
                                    "foxpoll.polling", "foxpoll.ratelimit", "foxpoll.testing",
                                    "foxpoll.transports"])
def test_all_is_sorted_and_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert list(mod.__all__) == sorted(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_package_exports_only_public_names() -> None:
    submodules = {"backoff", "cli", "dedup", "delivery", "errors", "events", "metrics",
                  "models", "polling", "ratelimit", "recovery", "testing", "transports"}
    public = {n for n in dir(foxpoll) if not n.startswith("_")} - submodules
    assert public <= set(foxpoll.__all__)


def test_py_typed_ships() -> None:
    from importlib.resources import files

    assert files("foxpoll").joinpath("py.typed").is_file()


TWINS = [
    (foxpoll.FoxReload, foxpoll.AsyncFoxReload),
    (_resources.Orders, _resources.AsyncOrders),
    (_resources.Products, _resources.AsyncProducts),
    (_resources.Categories, _resources.AsyncCategories),
]


@pytest.mark.parametrize(("sync", "async_"), TWINS)
def test_sync_and_async_signatures_match(sync: type, async_: type) -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(member)
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") or name == "__init__"
        }

    # An async twin's name when it is not the sync one's (httpx's AsyncClient.aclose).
    async_name = {"close": "aclose"}
    sync_methods, async_methods = public(sync), public(async_)
    assert {async_name.get(name, name) for name in sync_methods} == async_methods.keys()
    for sync_name, signature in sync_methods.items():
        name = async_name.get(sync_name, sync_name)
        other = async_methods[name]
        sync_params = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
        async_params = [(p.name, p.kind, p.default) for p in other.parameters.values()]
        if name == "__init__":  # the http client's type differs, by design
            sync_params = [p for p in sync_params if p[0] != "http_client"]
            async_params = [p for p in async_params if p[0] != "http_client"]
        assert sync_params == async_params, name
        if name == "wait_many":  # an async iterator, for `async for`
            assert "AsyncIterator" in str(other.return_annotation)
        elif name not in ("__init__", "with_options"):
            assert inspect.iscoroutinefunction(getattr(async_, name)), name


def test_clients_take_their_own_kind_of_http_client() -> None:
    import httpx

    hints = {
        cls: inspect.signature(cls).parameters["http_client"] for cls in
        (foxpoll.FoxReload, foxpoll.AsyncFoxReload)
    }
    assert all(p.default is None and p.kind is p.KEYWORD_ONLY for p in hints.values())
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"id": "o1", "status": "active", "items": []})

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        foxpoll.FoxReload("k", http_client=http).orders.get("o1")
    assert seen == ["/api/orders/o1"]  # sent through the caller's client


# -- every public type is importable where users look -------------------------------------

#: Where users import from: the package, the subpackages the docs name, and the two
#: modules of optional backends (whose dependencies only their extras install), each
#: with a page of the reference.
PLACES = ["foxpoll", "foxpoll.dedup", "foxpoll.events", "foxpoll.metrics", "foxpoll.ratelimit",
          "foxpoll.recovery", "foxpoll.testing", "foxpoll.transports"]
REFERENCE = Path(__file__).parent.parent / "docs" / "reference"


def _exports() -> dict[str, object]:
    """Every name of every place's ``__all__`` (``place.name``) and its object."""
    found = {}
    for place in PLACES:
        module = importlib.import_module(place)
        for name in module.__all__:
            found[f"{place}.{name}"] = getattr(module, name)
    return found


def _types_in(hint: object) -> Iterator[type]:
    """The classes a (resolved) annotation names, at any depth."""
    if isinstance(hint, list):  # Callable's parameters
        for part in hint:
            yield from _types_in(part)
        return
    origin = typing.get_origin(hint)
    if isinstance(origin, type):
        yield origin
    if origin is not None:
        for arg in typing.get_args(hint):
            yield from _types_in(arg)
    elif isinstance(hint, type):
        yield hint


#: Reached as ``client.orders`` and the like, never built by users: their constructors
#: take the client's internals.
BUILT_BY_THE_CLIENT = {"Orders", "AsyncOrders", "Products", "AsyncProducts", "Categories",
                       "AsyncCategories"}


def _annotated(obj: object) -> Iterator[tuple[str, object]]:
    """(where, annotation) for a public function, or each public member of a class."""
    if inspect.isclass(obj):
        seen: set[str] = {"__init__"} if obj.__name__ in BUILT_BY_THE_CLIENT else set()
        for klass in obj.__mro__:
            if not klass.__module__.startswith("foxpoll"):
                continue
            for name, hint in typing.get_type_hints(klass).items():
                if not name.startswith("_"):
                    yield f"{obj.__qualname__}.{name}", hint
            for name, member in vars(klass).items():
                if name in seen or (name.startswith("_") and name != "__init__"):
                    continue
                seen.add(name)
                if isinstance(member, property):
                    member = member.fget
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    for hint in typing.get_type_hints(member).values():
                        yield f"{obj.__qualname__}.{name}", hint
    elif inspect.isfunction(obj):
        for hint in typing.get_type_hints(obj).values():
            yield obj.__qualname__, hint


def test_every_type_in_a_public_signature_imports_from_a_documented_place() -> None:
    exported = {id(obj) for obj in _exports().values()}
    assert exported
    missing: dict[str, set[str]] = {}
    for obj in {id(o): o for o in _exports().values()}.values():
        for where, hint in _annotated(obj):
            for cls in _types_in(hint):
                if cls.__module__.startswith("foxpoll") and id(cls) not in exported:
                    missing.setdefault(f"{cls.__module__}.{cls.__qualname__}", set()).add(where)
    assert missing == {}, f"not importable from {PLACES}: {missing}"


#: Parameters typed ``object`` on purpose: an error's JSON body, of any shape.
ANY_OBJECT = {"body"}


def test_no_public_parameter_is_typed_object() -> None:
    """``object`` tells a user nothing: a listener is a :class:`foxpoll.Listener`, and so
    on. (Unpacked ``**kwargs: object`` pass through to a typed constructor.)"""
    loose = set()
    for obj in _exports().values():
        functions = [obj] if inspect.isfunction(obj) else [
            member for klass in getattr(obj, "__mro__", ())
            if klass.__module__.startswith("foxpoll")
            for name, member in vars(klass).items()
            if inspect.isfunction(member) and (not name.startswith("_") or name == "__init__")]
        for function in functions:
            parameters = inspect.signature(function).parameters
            for name, hint in typing.get_type_hints(function).items():
                if name == "return" or name in ANY_OBJECT or name.startswith("_") \
                        or parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                     inspect.Parameter.VAR_KEYWORD):
                    continue
                if hint is object or object in typing.get_args(hint):
                    loose.add(f"{function.__qualname__}({name})")
    assert sorted(loose) == []


def _directives() -> Iterator[tuple[str, list[str] | None]]:
    """Each ``::: target`` of the API reference, with its ``members:`` list when it has one
    (``members: false``, a module's docstring alone, lists none)."""
    for page in sorted(REFERENCE.glob("*.md")):
        for block in re.split(r"^(?=::: )", page.read_text(), flags=re.M):
            if not block.startswith("::: "):
                continue
            target = block.split()[1]
            if re.search(r"members:\s*false", block):
                yield target, []
                continue
            listed = re.search(r"members:\s*\[([^\]]*)\]", block)
            yield target, None if listed is None else re.findall(r"\w+", listed.group(1))


def _resolve(target: str) -> object:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError:
        parent, _, name = target.rpartition(".")
        return getattr(importlib.import_module(parent), name)


def _rendered() -> list[tuple[str, object]]:
    """What the reference renders, as (the path it shows, the object): a module's listed
    members (else, as mkdocstrings does, its ``__all__`` and every public class and
    function it defines), or the one object a target names."""
    rendered: list[tuple[str, object]] = []
    for target, members in _directives():
        obj = _resolve(target)
        if inspect.ismodule(obj):
            names = members if members is not None else [*getattr(obj, "__all__", ()), *(
                name for name, member in vars(obj).items()
                if not name.startswith("_") and getattr(member, "__module__", None) == target
                and (inspect.isclass(member) or inspect.isfunction(member)))]
            rendered.extend((f"{target}.{n}", getattr(obj, n)) for n in names)
        else:
            rendered.append((target, obj))
    return rendered


def test_the_reference_renders_every_export() -> None:
    shown = {id(obj) for _, obj in _rendered()}
    hidden = sorted(where for where, obj in _exports().items()
                    if id(obj) not in shown and not where.endswith("__version__"))
    assert hidden == [], " ".join(hidden)


def test_the_reference_renders_nothing_but_exports() -> None:
    """A helper the reference shows is public API: it is exported where users look, or
    left out of the page."""
    exported = {id(obj) for obj in _exports().values()}
    extra = sorted(f"{path}: {getattr(obj, '__name__', obj)}" for path, obj in _rendered()
                   if id(obj) not in exported)
    assert extra == [], " ".join(extra)


def test_the_reference_renders_each_export_once_where_users_import_it() -> None:
    """Each export is shown once, under the first place of ``PLACES`` that exports it
    (``foxpoll.DeliveryResult``, ``foxpoll.dedup.DedupStore``), never under the module
    that defines it; a module is shown only when it is such a place."""
    first: dict[int, str] = {}
    for where, obj in _exports().items():
        first.setdefault(id(obj), where)
    paths = [path for path, _ in _rendered()]
    assert sorted(p for p in set(paths) if paths.count(p) > 1) == []
    misplaced = sorted(f"{path} (import it from {first.get(id(obj))})"
                       for path, obj in _rendered() if path != first.get(id(obj)))
    assert misplaced == [], " ".join(misplaced)
    modules = sorted({target for target, _ in _directives()
                      if inspect.ismodule(_resolve(target))} - set(PLACES))
    assert modules == [], " ".join(modules)


LAZY_PACKAGES = ["foxpoll.dedup", "foxpoll.events", "foxpoll.recovery", "foxpoll.testing"]


def _type_checking_names(module: str) -> set[str]:
    """The names a package imports under ``if TYPE_CHECKING:``."""
    import ast

    path = Path(importlib.import_module(module).__file__ or "")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom):
                    names |= {alias.asname or alias.name for alias in statement.names}
    return names


@pytest.mark.parametrize("module", LAZY_PACKAGES)
def test_a_name_loaded_on_first_use_is_still_typed(module: str) -> None:
    # A module __getattr__ types every name it serves as Any: a type checker sees the
    # real class only through an import under TYPE_CHECKING.
    import subprocess
    import sys

    drivers = ["redis", "psycopg", "psycopg_pool", "boto3", "botocore", "aioboto3",
               "procrastinate", "pytest"]
    code = (f"import sys, {module} as m; print(' '.join(sorted(n for n in m.__all__ "
            f"if n not in vars(m)))); print(' '.join(d for d in {drivers!r} "
            "if d in sys.modules))")
    served, loaded = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert served, f"{module} loads nothing on first use"
    assert set(served.split()) == _type_checking_names(module)
    assert loaded == "", f"importing {module} loaded {loaded}"
