"""Argument checks shared by every transform: one message shape, ``what it must be ... Received: name=value``."""

import numbers


def _fail(kind, name, must, hint, value):
    hint = f" {hint}" if hint else ""
    return kind(f"`{name}` must be {must}.{hint} Received: {name}={value!r}")


def check_bool(value, name, hint=""):
    """`value` as a bool; numpy bools pass, ints do not."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise _fail(TypeError, name, "True or False", hint, value)
    return bool(value)


def check_int(value, name, minimum=None, hint="", none_ok=False):
    """`value` as an int (bools refused) that is at least `minimum`; None passes when `none_ok`."""
    if value is None and none_ok:
        return None
    must = "an integer" if minimum is None else f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(TypeError, name, must, hint, value)
    if minimum is not None and value < minimum:
        raise _fail(ValueError, name, must, hint, value)
    return int(value)


def check_fraction(value, name, hint="", high_closed=False):
    """`value` as a float in [0, 1) (or [0, 1] with `high_closed`)."""
    must = f"a number in [0, 1{']' if high_closed else ')'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, name, must, hint, value)
    if not (0.0 <= float(value) <= 1.0) or (float(value) == 1.0 and not high_closed):
        raise _fail(ValueError, name, must, hint, value)
    return float(value)


def check_choice(value, name, choices, hint=""):
    """`value` when it is one of `choices`."""
    if not isinstance(value, str) or value not in choices:
        raise _fail(ValueError, name, f"one of {tuple(choices)}", hint, value)
    return value
