"""What the bundle's command line can get wrong silently, caught before any work.

MONAI's ``python -m monai.bundle run ... --key value`` sets ``key`` whether or not the configs define it, so a
misspelled override (``--vqvae#epoch 2``) is added as a new id nobody reads and the run goes on with the default.
:func:`check_overrides` (called by each config's ``initialize``) compares the command line's ids with the ids of the
config files it names and stops on one that matches none, suggesting the closest ids. ``--allow_new_ids True``
accepts new ids on purpose. Calls from Python (``monai.bundle.run(...)``, MONAI Label) are not checked: their
arguments are not on the command line.
"""

from __future__ import annotations

import ast
import difflib
import dis
import functools
import inspect
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from monai.bundle import ConfigParser

# the arguments of `monai.bundle run` and of its workflow, which are not config ids
RUN_ARGUMENTS = {
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_type", "workflow_name", "properties_path",
}  # fmt: skip


SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(SCRIPTS), "configs")

# renamed ids (metadata.json's changelog) -> (new id, version): a command line or preset that still uses one is told
RENAMED = {
    "iltm_max_iterations": ("iltm#max_iterations", "0.3.0"),
    "threshold_decay": ("iltm#threshold_decay", "0.3.0"),
    "fixed_threshold": ("iltm#fixed_threshold", "0.3.0"),
    "transformer#stage#lr": ("transformer#lr", "0.3.0"),
    "transformer#stage#weight_decay": ("transformer#weight_decay", "0.3.0"),
    "loading": ("preprocessing", "0.4.0"),
    "resize": ("spatial", "0.4.0"),
    "transformer#stage#epochs": ("transformer#epochs", "0.4.0"),
    "transformer#stage#batch_size": ("transformer#batch_size", "0.4.0"),
    "transformer#stage#num_workers": ("num_workers", "0.4.0"),
    "transformer#stage#device": ("device", "0.4.0"),
    "transformer#stage#amp": ("amp", "0.4.0"),
    "overlay_threshold": ("segmentation_threshold", "0.7.5"),
}


class UnknownSetting(ValueError):
    """A command-line override that matches no id of the configs."""


def as_list(value: Any) -> list:
    """A list from what the command line (fire) passes: "a,b", "[a, b]", a bare value, a list or tuple; None: []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().strip("'\"") for v in value.strip("()[] ").split(",") if v.strip().strip("'\"")]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def quiet(fn: Callable) -> Callable:
    """A fire command without its return value, which fire would echo after what the command printed; same signature
    and help."""

    @functools.wraps(fn)
    def command(*args, **kwargs) -> None:
        fn(*args, **kwargs)

    return command


def fire_main(component: Any, **kwargs: Any) -> None:
    """``fire.Fire(component)`` for the ``python -m scripts....`` commands: an error the bundle raises on purpose ends
    the command with its message (which names the file and the problem) and exit status 1, not a traceback through
    fire. On purpose: one of the bundle's own exception classes, or an exception a ``raise`` statement of the bundle's
    code raised, also where MONAI's config parser wrapped it; a failure inside an expression (a bug) keeps its
    traceback, as does everything else."""
    import fire

    from scripts.data import DataError

    quiet, DataError.quiet = DataError.quiet, True  # said once, below, not also logged where it is raised
    try:
        given = kwargs.get("command")
        argv = sys.argv[1:] if given is None else shlex.split(given) if isinstance(given, str) else given
        _check_flags(component, argv)  # an empty command is fire's too: not the process's arguments
        fire.Fire(component, **kwargs)
    except KeyboardInterrupt:
        print("\ninterrupted (a sweep or a preparation, run again, goes on from what it finished)", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - re-raised unless the bundle raised it on purpose
        cause = _on_purpose(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(1)
    finally:
        DataError.quiet = quiet


def _check_flags(component: Any, argv: Sequence[str]) -> None:
    """Flags the command does not have stop it before any work: fire runs the command with the flags it knows and
    only then complains of the rest (`make_2d --ntrain 5` generated the whole default set first)."""
    if any(a in ("-h", "--help") for a in argv):
        return
    if isinstance(component, dict):
        names = [a for a in argv if not a.startswith("-")]
        if not names or names[0] not in component:
            return  # fire names the commands there are
        component = component[names[0]]
    try:
        parameters = inspect.signature(component).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # takes any flag (diagnose's config overrides), and checks them itself
    known = {name.replace("_", "-") for name in parameters}
    args = list(argv[: list(argv).index("--")]) if "--" in argv else list(argv)  # after "--": fire's own flags
    flags = [a[2:].split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = [
        f for f in flags if f.replace("_", "-") not in known and f.replace("_", "-").removeprefix("no") not in known
    ]
    if unknown:
        hints = [
            f"--{f}" + (f" (did you mean --{close[0]}?)" if (close := difflib.get_close_matches(
                f.replace("-", "_"), list(parameters), n=1)) else "")
            for f in unknown
        ]  # fmt: skip
        options = [f"--{n}" for n, p in parameters.items() if p.kind is not p.VAR_POSITIONAL]
        raise UnknownSetting(
            f"no such option: {', '.join(hints)}; {getattr(component, '__name__', 'the command')} takes "
            + (", ".join(options) or "no options")
        )


def _on_purpose(error: BaseException | None) -> BaseException | None:
    """The first exception in the chain of `error` and its causes that the bundle raised on purpose, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _ours(type(error).__module__) or _raised_by_the_bundle(error):
            return error
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return None


def _ours(module: str, path: str | None = None) -> bool:
    """Whether a module is the bundle's: by its name, or by its file, since ``python -m scripts.X`` runs X as
    ``__main__``."""
    path = path or getattr(sys.modules.get(module), "__file__", None)
    return module.partition(".")[0] == "scripts" or bool(path) and os.path.abspath(path).startswith(SCRIPTS + os.sep)


def _raised_by_the_bundle(error: BaseException) -> bool:
    """Whether the innermost frame is the bundle's and stopped at a ``raise`` statement (not at a failing call)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not _ours(tb.tb_frame.f_globals.get("__name__", ""), tb.tb_frame.f_code.co_filename):
        return False
    return dis.opname[tb.tb_frame.f_code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"


def _ids(config: Any, prefix: str = "") -> Iterator[str]:
    """Every id a user could set: list items (`imports#9`) are steps, not settings."""
    if not isinstance(config, dict):
        return
    for key, value in config.items():
        yield f"{prefix}{key}"
        yield from _ids(value, f"{prefix}{key}#")


def command_line_ids(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(config files, override ids) of a `python -m monai.bundle run ...` command line (fire's `--key value`)."""
    files: list[str] = []
    keys: list[str] = []
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        key, _, inline = token[2:].partition("=")
        if key == "config_file":
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = value
            files = [parsed] if isinstance(parsed, str) else list(parsed)
        elif key not in RUN_ARGUMENTS:
            keys.append(key)
    return files, keys


def unknown_ids(config_files: Sequence[str], keys: Sequence[str]) -> list[str]:
    """One message per key that no id of the merged `config_files` matches, with the closest ids."""
    return _unknown(_merged(config_files), keys, ", ".join(config_files))


def _merged(config_files: Sequence[str]) -> ConfigParser:
    return ConfigParser(ConfigParser.load_config_files(list(config_files)))


def _unknown(parser: ConfigParser, keys: Sequence[str], where: str) -> list[str]:
    known = sorted(set(_ids(parser.get())))
    messages = []
    for key in keys:
        if key in RENAMED:
            messages.append(f"--{key}: renamed {RENAMED[key][0]} in version {RENAMED[key][1]}")
            continue
        source = passed_on(parser, key.replace("::", "#"))
        if source:
            messages.append(f"--{key}: only passes on {source} to its component; set --{source}, the one id of "
                            "that setting (the id the run records)")  # fmt: skip
            continue
        if key.replace("::", "#") in parser or key.lstrip("+") in parser:
            continue
        other = _other_stage(key.replace("::", "#"), where)
        if other:
            messages.append(f"--{key}: {other}")
            continue
        close = [c for c in difflib.get_close_matches(key, known, n=6, cutoff=0.6) if not passed_on(parser, c)][:3]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        messages.append(f"--{key}: no such setting in {where}{hint}")
    return messages


def _other_stage(key: str, where: str) -> str | None:
    """Why an id unknown here is a setting all the same: training's, given to inference or evaluation (a training
    command's overrides copied over), or theirs, given to training."""
    stages = (("train.yaml", "a training setting (configs/train.yaml): inference and evaluation do not read it"),
              ("inference.yaml", "an inference setting (configs/inference.yaml): training does not read it"))  # fmt: skip
    for config, says in stages:
        if config not in where and key in ConfigParser(ConfigParser.load_config_file(os.path.join(CONFIGS, config))):
            return f"{says}; drop it"
    return None


def passed_on(parser: ConfigParser, key: str) -> str | None:
    """The setting a component's argument takes its value from (``arg: "@id"`` inside a ``_target_`` dict), or None.

    Such an argument is not a setting of its own: overriding it would bypass the setting, and the run's record
    (run.json) would show the setting's value, not the one used.
    """
    parent = key.rpartition("#")[0]
    if not parent or key not in parser or parent not in parser:
        return None
    component, value = parser[parent], parser[key]
    if isinstance(component, dict) and "_target_" in component and isinstance(value, str):
        match = re.fullmatch(r"@([\w#]+)", value.strip())
        return match.group(1) if match else None
    return None


def check_overrides(allow_new_ids: bool = False, argv: Sequence[str] | None = None) -> None:
    """Stops a `python -m monai.bundle` command whose overrides name ids the configs do not define."""
    if allow_new_ids is True:
        return
    if argv is None:
        if not sys.argv or not sys.argv[0].endswith(os.path.join("monai", "bundle", "__main__.py")):
            return  # called from Python: not a command line
        argv = sys.argv[1:]
    files, keys = command_line_ids(argv)
    if not files:
        return
    check_ids(_merged(files), keys, ", ".join(files))


def check_ids(parser: ConfigParser, keys: Sequence[str], where: str) -> None:
    """Stops when `keys` (overrides about to be applied to `parser`) or the configs use unknown or old ids."""
    messages = _unknown(parser, keys, where)
    messages += [f"{where} set {old}: renamed {new} in version {version}" for old, (new, version) in RENAMED.items()
                 if old in parser and parser[old] is not None]  # fmt: skip
    if messages:
        unknown = not all("only passes on" in m for m in messages)  # a passed-on id is known: MONAI would not add it
        raise UnknownSetting(
            "\n".join(messages)
            + (
                "\nFix these names (MONAI would add an unknown id as a new one that nothing reads, and the run would "
                "use the defaults), or pass --allow_new_ids True to add new ids on purpose."
                if unknown
                else ""
            )
        )
