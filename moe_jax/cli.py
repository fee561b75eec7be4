"""What every command (`main`, `dryrun`, `sweep`, ...) shares: a user's mistake is one `error: ...` line.

    if __name__ == "__main__":
        cli.run(main)            # absl flags parsed by `parse_flags`, user errors caught around `main`

A mistake the user typed (an unknown or mistyped `--config.*` key, a value out of range, a missing file, a
mesh that does not fit the devices) prints `error: <what, and what is allowed>` on stderr, maybe with a few
indented lines of explanation, and exits with status 2, without a traceback. Anything else is a bug and keeps
its traceback. `MOE_JAX_TRACEBACK=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Optional, Sequence

USAGE_ERROR_EXIT = 2


class UserError(ValueError):
    """A mistake in what the user typed or pointed at (config, paths, data); the message says what is allowed."""


# The exceptions the library raises for bad input: a config value (ValueError, with the key in the message),
# a missing file (FileNotFoundError), a jsonl record without the text field (KeyError), an unreadable
# checkpoint (checkpoint.CheckpointError is a RuntimeError subclass and is added by name below).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


def fail(message: str) -> "NoReturn":  # noqa: F821
    """Print `error: message` (later lines indented) and exit with status 2."""
    lines = str(message).strip().splitlines() or ["(no message)"]
    text = "error: " + lines[0] + "".join(f"\n  {line.strip()}" for line in lines[1:] if line.strip())
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR_EXIT)


def describe_flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """A parsing error of absl / ml_collections flags as one readable message naming the flag."""
    chain = _chain(error)
    text = " ".join(str(e) for e in chain)
    unknown = next((e for e in reversed(chain) if isinstance(e, KeyError)), None)
    if unknown is not None and isinstance(error, (AttributeError, KeyError)):
        key = _strip_quotes(str(unknown.args[0]) if unknown.args else "")
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                     re.search(rf"\.{re.escape(key)}(=|$|\.)", a.split("=", 1)[0] + "=")), f"--config...{key}")
        name = flag[2:].removeprefix("config.")
        suggestion = re.search(r'Did you mean \\*"([^"\\]+)\\*"', text)
        hint = ""
        if suggestion:  # the unknown part may be a section (--config.modl.d_model): replace that part only
            parts = name.split(".")
            at = max((i for i, part in enumerate(parts) if part == key), default=len(parts) - 1)
            hint = f"; did you mean {'.'.join(parts[:at] + [suggestion.group(1)] + parts[at + 1:])}?"
        return f"unknown config key {name} ({flag}=...){hint}"
    message = str(error)
    match = re.search(r"flag --(\w+) must have a value other than None", message, re.I)
    if match:
        return f"--{match.group(1)} is required"
    match = re.search(r"flag --([\w.]+)=(.*?): (.*)", message, re.S)
    if match:
        name, value, why = match.groups()
        raised = re.findall(r"^(\w+(?:Error|Exception)): (.+)$", why, re.M)
        why = why.strip().splitlines()[0]
        if "Error whilst parsing config file" in why and raised:  # get_config(arg) raised: say what it said
            why = "the config file raised {}: {}".format(*raised[-1])
        if name.startswith("config.") and "invalid literal" in why:
            kind = re.search(r"invalid literal for (\w+)\(\)", why)
            why = f"expected {'an integer' if kind and kind.group(1) == 'int' else 'a number'}"
        return f"--{name}={value}: {why}"
    if "Failed loading config file" in message or "Configuration is not available" in message:
        tried = re.findall(r"^\s{4}(\S.*)$", message, re.M)
        reason = re.findall(r"\[Errno \d+\] ([^\n]+)", message)
        return (f"--config: cannot load the config file {tried[0] if tried else ''}"
                f"{': ' + reason[0] if reason else ''}").strip()
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parser, with every parsing error as one `error:` line (an `app.run(flags_parser=...)`)."""
    from absl import flags

    try:
        remaining = flags.FLAGS(list(argv))
        for name in flags.FLAGS:  # a config file that failed to load is an _ErrorConfig that raises on use
            value = flags.FLAGS[name].value
            if type(value).__name__ == "_ErrorConfig":
                value._ReportError()
        return remaining
    except Exception as error:  # absl, ml_collections and config files raise many types while parsing
        if os.environ.get("MOE_JAX_TRACEBACK"):
            raise
        fail(describe_flag_error(error, argv))


def run(main: Callable[[list[str]], int], *, define_flags: Optional[Callable[[], None]] = None,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """`absl.app.run(main)` with `parse_flags`, and the library's user errors printed as `error:` lines.

    `define_flags`, if given, defines the command's flags first; its errors are flag errors too
    (`config_flags.DEFINE_config_dict` reads the `--config.*` overrides as it defines them)."""
    from absl import app

    from moe_jax import checkpoint

    if define_flags is not None:
        try:
            define_flags()
        except Exception as error:  # ml_collections raises KeyError/AttributeError chains for unknown keys
            if os.environ.get("MOE_JAX_TRACEBACK"):
                raise
            fail(describe_flag_error(error, sys.argv))

    caught = USER_ERRORS + (checkpoint.CheckpointError,) + tuple(user_errors)

    def guarded(argv):
        try:
            code = main(argv)
        except caught as error:
            if os.environ.get("MOE_JAX_TRACEBACK"):
                raise
            fail(_message(error))
        sys.exit(code or 0)

    app.run(guarded, flags_parser=parse_flags)


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])  # KeyError's str() is the repr of its message
    return str(error) or type(error).__name__


def _chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _strip_quotes(text: str) -> str:
    previous = None
    while previous != text:
        previous = text
        text = text.strip().strip("'\"\\").replace("\\'", "'")
    return text
