"""Typed options of the function forms: each form declares its config fields once, as a frozen dataclass whose fields
carry their default, their allowed range and their help text (as peft's `LoraConfig` does).

    @dataclass(frozen=True)
    class BottleneckOptions(Options):
        mid_dim: int = int_option(help="bottleneck width")
        method: str = choice_option(tuple(METHODS), "default", help="activation between the two layers")

`Options.parse` checks a config entry's fields against these declarations (an error names the field, the value and the
rule) and returns the instance the form is built from; the help of `--help` texts and docs/adapter-forms.md is
rendered from the same declarations (`ldm.modules.adapters.schema.options_help`).
"""
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ldm.checks import check_number as check_any_number
from ldm.checks import describe_range
from ldm.modules.adapters.spec import REQUIRED, AdapterConfigError


def _option(default: Any, help: str, rule: str, check: Callable[[Any, str], Any]) -> Any:
    return field(default=default, metadata={"help": help, "rule": rule, "check": check})


def int_option(default: Any = REQUIRED, help: str = "", low: int = 1, high: Optional[int] = None) -> Any:
    """An integer field in [low, high]; YAML text such as "60" and floats such as 2.0 are refused."""
    rule = "a positive integer" if low == 1 and high is None else describe_range(low, high, integer=True)

    def check(value: Any, where: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
        if not ok:
            raise AdapterConfigError(f"{where} must be {rule}, got {value!r}")
        return value
    return _option(default, help, rule, check)


def number_option(default: Any = REQUIRED, help: str = "", optional: bool = False, hint: str = "", **limits: Any
                  ) -> Any:
    """A finite number (NaN refused) in the range of `limits` (`ldm.checks.check_number`'s low, high, low_open,
    high_open); None too when `optional`."""
    rule = describe_range(limits.get("low"), limits.get("high"), False, limits.get("low_open", False),
                          limits.get("high_open", False)) + (" or null" if optional else "")

    def check(value: Any, where: str) -> Any:
        return check_any_number(value, where, optional=optional, hint=hint, error=AdapterConfigError, **limits)
    return _option(default, help, rule, check)


def bool_option(default: Any = False, help: str = "") -> Any:
    def check(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise AdapterConfigError(f"{where} must be true or false, got {value!r}")
        return value
    return _option(default, help, "true or false", check)


def choice_option(choices: Sequence[str], default: Any = REQUIRED, help: str = "") -> Any:
    choices = tuple(choices)

    def check(value: Any, where: str) -> str:
        if value not in choices:
            name = where.rsplit(".", 1)[-1]
            raise AdapterConfigError(f"{where}: unknown {name} {value!r}; allowed: {', '.join(choices)}")
        return value
    return _option(default, help, "one of " + ", ".join(choices), check)


def custom_option(check: Callable[[Any, str], Any], rule: str, default: Any = REQUIRED, help: str = "") -> Any:
    """A field with its own check (value, where) -> normalised value."""
    return _option(default, help, rule, check)


@dataclass(frozen=True)
class Options:
    """A form's config fields. Subclasses declare them with the *_option helpers; `normalised` holds the rules that
    tie fields together (e.g. LoRA's alpha defaults to its rank)."""

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def parse(cls, values: Mapping[str, Any], where: str) -> "Options":
        """The options of a config entry (only this form's fields; absent ones take their defaults), checked."""
        missing = [f.name for f in fields(cls) if values.get(f.name, f.default) is REQUIRED]
        if missing:
            raise AdapterConfigError(f"{where}: missing field(s) {', '.join(missing)}")
        checked = {f.name: f.metadata["check"](values.get(f.name, f.default), f"{where}.{f.name}")
                   for f in fields(cls)}
        return cls(**checked).normalised(where)

    def normalised(self, where: str) -> "Options":
        return self

    def items(self) -> Tuple[Tuple[str, Any], ...]:
        return tuple((f.name, getattr(self, f.name)) for f in fields(self))

    def to_dict(self) -> Dict[str, Any]:
        """Plain YAML values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.items()}

    @classmethod
    def help_rows(cls) -> List[Tuple[str, str, str, str]]:
        """(field, default, allowed values, help) of every field, for --help texts and the docs."""
        return [(f.name, _yaml(f.default), f.metadata["rule"], f.metadata["help"]) for f in fields(cls)]


def _yaml(value: Any) -> str:
    """A default as a config file writes it: required, null, true, 0.0, default."""
    if value is REQUIRED:
        return "required"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value)
