"""One line for a jsonargparse error: where, what is wrong and, for an unknown option, the closest accepted one.

jsonargparse reports a bad argument of a class (the model, the data, a callback) twice, and both reports reach the
parser's ``error`` method (argparse's hook for errors, which ``lightning-cnet`` overrides):

1. the parser of the class says what is wrong in its own terms (``Option 'n_stepz' is not accepted``), and knows the
   options the class takes;
2. the parser above says it again, as the failure of one alternative of the key's type::

       Parser key "model":
         Does not validate against any of the Union subtypes
         ...
         Errors:
           - Option 'n_stepz' is not accepted
           - Expected a <class 'NoneType'>

The first report is kept as the :class:`~lightning_cnet._cli_common.UsageError` that ``error`` raises; jsonargparse
catches it and raises the second, with the first in its exception chain. :func:`condense` then joins the key of the
second to the message of the first. Of jsonargparse's wording, only three phrases are read: the header
``Parser key "<key>":``, the ``- <error>`` bullets (used when no class parser reported first, e.g. a class path that
cannot be imported) and the unknown-option phrases. ``tests/test_cli.py`` runs the CLI on each kind of mistake, so an
upgrade of jsonargparse that rewords them fails there, and a message this module cannot read is shown whole.

Example:
    >>> condense('Parser key "data":\\n  Errors:\\n    - Expected a path but x.Y either not accessible or invalid\\n'
    ...          "    - Problem with given class_path 'x.Y': No module named 'x'")
    "data: Problem with given class_path 'x.Y': No module named 'x'"
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from lightning_cnet._cli_common import UsageError, exception_chain

#: ``Parser key "model":`` (and what follows on the same line).
_HEADER = re.compile(r'Parser key "([\w.]+)":\s*(.*)')
#: An option the parser does not know, as jsonargparse and argparse name it.
_UNKNOWN = re.compile(r"Option '([\w.]+)' is not accepted|does not accept option '([\w.]+)'"
                      r"|unrecognized arguments: --([\w.]+)")
#: Bullets that restate the type of the key rather than say what is wrong with the value.
_RESTATING = ("Expected a <class 'NoneType'>", "Does not validate against any of the Union subtypes",
              "Not a valid subclass of", "Expected a path but", "Expected a dot import path")


def condense(message: str, parser: Any = None, ex: BaseException | None = None) -> str:
    """One line for the error ``message`` that ``parser`` raised (``ex``: the exception it came with).

    Args:
        message: jsonargparse's message.
        parser: the parser whose options an unknown option is compared with (``None``: no suggestion).
        ex: the exception jsonargparse passed to ``error``; a class parser's report in its chain is preferred.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    header = _HEADER.match(lines[0]) if lines else None
    key = header.group(1) if header else None
    reported = _class_parser_report(ex)
    if reported is None:
        body = lines[1:] if header else lines
        details = [bullet for bullet in _bullets(body) if not bullet.startswith(_RESTATING)]
        fallback = header.group(2) if header else ""
        reported = _with_suggestion(details[0] if details else fallback or " ".join(body) or "invalid value", parser)
    return f"{key}: {reported}" if key else reported


def _bullets(lines: list[str]) -> list[str]:
    """The ``- ...`` items of ``lines``, an item ending in ``:`` joined with the line after it."""
    items = []
    for index, line in enumerate(lines):
        if not line.startswith("- "):
            continue
        item = line[2:]
        if item.endswith(":") and index + 1 < len(lines) and not lines[index + 1].startswith("- "):
            item = f"{item} {lines[index + 1]}"
        items.append(item)
    return items


def _class_parser_report(ex: BaseException | None) -> str | None:
    """The message of the :class:`UsageError` a class's parser raised before, found in ``ex``'s chain."""
    if ex is None:
        return None
    return next((str(cause) for cause in exception_chain(ex) if isinstance(cause, UsageError)), None)


def _with_suggestion(text: str, parser: Any) -> str:
    """``text`` about an unknown option, with the closest option ``parser`` accepts and the whole list."""
    unknown = _UNKNOWN.search(text)
    if unknown is None or parser is None:
        return text
    option = next(group for group in unknown.groups() if group)
    accepted = _options(parser)
    hint = difflib.get_close_matches(option, accepted, n=1)
    text = f"unknown option {option!r}" if unknown.group(1) else text
    text += f"; did you mean {hint[0]!r}?" if hint else ""
    return text + (f" Accepted: {', '.join(accepted)}" if unknown.group(1) and accepted else "")


def _options(parser: Any) -> list[str]:
    """The option names ``parser`` has defaults for (an empty list if it cannot say)."""
    try:
        return [str(key) for key in parser.get_defaults(skip_validation=True).keys()]
    except Exception:  # noqa: BLE001 - a suggestion is optional; the message stands without it
        return []


__all__ = ["condense"]
