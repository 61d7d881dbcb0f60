"""Options made from a run configuration: one per field declared with
:func:`asymflow.settings.setting` (``t_low`` -> ``--t-low``, a bool ``--augment/--no-augment``),
in the field's help panel, its help ending with the field's own default.

An option left out is None, so that a command sees the fields given: applied over the config's
defaults, or with ``--resume`` compared with the run's ``config.json`` (:meth:`Run.config`).
The values are checked once, by the config's ``__post_init__``; only lists are parsed here
(``8,16`` -> ``(8, 16)``). The options are made when the command is first looked up: the
config modules import torch, which the other commands start without.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from typer.core import TyperCommand, TyperOption

from asymflow.cli.common import CliInputError, JsonOpt, errors, option_name, parse_int_list
from asymflow.runfiles import CONFIG_FILE, read_config

__all__ = [
    "ConfigCommand",
    "Run",
    "config_command",
    "option_names",
    "run_command",
]

T = TypeVar("T")
Command = Callable[..., None]
_SPEC = "asymflow_config_options"
_TYPES: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}

OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        metavar="RUN_DIR",
        help="New run directory (config.json, metrics.jsonl, ledger.sqlite, checkpoints, "
        "result.json), or the run to continue with --resume. Required.",
        rich_help_panel="Run",
    ),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run in --out from its latest checkpoint (or start it). Options left "
        "out are read from its config.json; options given must match it.",
        rich_help_panel="Run",
    ),
]


def config_class(path: str) -> type:
    """The config class at ``"module:Name"``, imported when first needed."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def config_command(path: str) -> Callable[[Command], Command]:
    """Make ``command(*, ..., given, ...)`` a command whose options, in the place of its
    keyword ``given``, are the documented fields of the config class at ``path``
    (:func:`config_class`); ``given`` receives the fields set. Register it with
    ``cls=ConfigCommand``."""

    def decorate(command: Command) -> Command:
        own = list(inspect.signature(command, eval_str=True).parameters.values())
        at = [p.name for p in own].index("given")

        def run(**options: Any) -> None:
            with errors():
                given = {
                    f.name: _parse(f.name, hint, value)
                    for f, hint in _documented(config_class(path))
                    if (value := options.pop(f.name)) not in (None, ())
                }
            command(given=given, **options)

        vars(run)[_SPEC] = (path, at)
        return _as_command(run, command, own[:at] + own[at + 1 :])

    return decorate


class ConfigCommand(TyperCommand):
    """A command of :func:`config_command`: its config's options join ``params`` on first
    access (help, parsing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._own: list[click.Parameter] = []
        self._all: list[click.Parameter] | None = None
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        if self._all is None:
            path, at = vars(self.callback)[_SPEC]
            made = [_option(f, hint) for f, hint in _documented(config_class(path))]
            self._all = self._own[:at] + made + self._own[at:]
        return self._all

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own, self._all = list(value), None


def option_names(path: str, **extra: str) -> dict[str, str]:
    """Field of the config at ``path`` -> its option, and ``extra`` names, for the messages
    of :func:`errors`."""
    return {
        **{f.name: option_name(f.name) for f in dataclasses.fields(config_class(path))},
        **extra,
    }


@dataclasses.dataclass(frozen=True)
class Run:
    """A training command's run (:func:`run_command`): its config class (``"module:Name"``),
    the run directory ``out`` (--out), ``resume`` (--resume), the config fields ``given`` and
    ``json_out`` (--json)."""

    config_path: str
    out: Path
    resume: bool
    given: Mapping[str, Any]
    json_out: bool

    def options(self, **extra: str) -> dict[str, str]:
        """Config field -> option for :func:`errors`, ``run_dir`` -> --out, and ``extra``."""
        return option_names(self.config_path, run_dir="--out", **extra)

    def config(self, new: Callable[[Mapping[str, Any]], T], options: Mapping[str, str]) -> T:
        """The run's config: ``new(given)`` for a new run directory; with --resume the run's
        own ``config.json``, which the options given (named by ``options``) must match."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise CliInputError(f"--out must be a directory, got the file {str(out)!r}")
        if not (out / CONFIG_FILE).is_file():
            return new(self.given)
        if not self.resume:
            raise CliInputError(
                f"--out already holds a run ({out}); pass --resume to continue it, or choose a "
                "new directory"
            )
        stored: T = read_config(out, config_class(self.config_path).from_dict)
        differ = [
            f"{options[name]} (run: {getattr(stored, name)}, given: {value})"
            for name, value in self.given.items()
            if getattr(stored, name) != value
        ]
        if differ:
            raise CliInputError(
                "--resume continues a run with the settings in its config.json; these options "
                f"differ: {', '.join(differ)}"
            )
        return stored


def run_command(path: str) -> Callable[[Callable[..., None]], Command]:
    """:func:`config_command` for a training run: ``command(run, *, ...)`` gets --out,
    --resume, the config's options and --json as one :class:`Run`; its own options stand
    between the config's and --json."""

    def decorate(command: Callable[..., None]) -> Command:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]

        def with_run(
            *, out: Path, resume: bool, given: dict[str, Any], json_out: bool, **options: Any
        ) -> None:
            command(Run(path, out, resume, given, json_out), **options)

        keyword = inspect.Parameter.KEYWORD_ONLY
        params = [
            inspect.Parameter("out", keyword, annotation=OutOpt),
            inspect.Parameter("resume", keyword, annotation=ResumeOpt, default=False),
            inspect.Parameter("given", keyword, annotation=dict[str, Any]),
            *own,
            inspect.Parameter("json_out", keyword, annotation=JsonOpt, default=False),
        ]
        return config_command(path)(_as_command(with_run, command, params))

    return decorate


def _as_command(
    run: Command, like: Callable[..., None], params: list[inspect.Parameter]
) -> Command:
    """``run`` with the parameters ``params``, and the name and help of ``like``."""
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    for name in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(run, name, getattr(like, name))
    return run


def _documented(config: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    """The fields of ``config`` declared with help, and their types."""
    hints = typing.get_type_hints(config)
    return [(f, hints[f.name]) for f in dataclasses.fields(config) if "help" in f.metadata]


def _shown(field: dataclasses.Field[Any]) -> str:
    """The default as the help shows it: on/off, ``16,64``, ``none: <what None means>``."""
    value = field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if value is None:
        unset = field.metadata["unset"]
        return "" if unset is None else f"none: {unset}"
    return str(value)


def _option(field: dataclasses.Field[Any], hint: Any) -> TyperOption:
    """The option of a documented field of type ``hint``."""
    meta = field.metadata
    name = option_name(field.name)
    shown = _shown(field)
    decls, kind = [name], click.STRING
    if hint is bool:
        decls, kind = [f"{name}/--no-{name[2:]}"], click.BOOL
    elif typing.get_origin(hint) is not tuple:
        kind = _TYPES[next(a for a in (*typing.get_args(hint), hint) if a is not type(None))]
    return TyperOption(
        param_decls=[*decls, field.name],
        type=kind,
        default=None,
        required=False,
        multiple=hint == tuple[str, ...],
        help=meta["help"] + (f" \\[default: {shown}]" if shown else ""),
        metavar=meta["metavar"],
        rich_help_panel=meta["panel"],
    )


def _parse(name: str, hint: Any, value: Any) -> Any:
    """A list option's value as the field's tuple (``8,16``; ``a,b`` or repeated); other
    values as given."""
    if hint == tuple[int, ...]:
        return parse_int_list(option_name(name), value)
    if hint == tuple[str, ...]:
        return tuple(part for item in value for part in item.split(",") if part)
    return value
