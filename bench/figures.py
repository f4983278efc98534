"""The benchmark's figures: each a measured value beside its target, printed as a table
and written as JSON."""

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Figure:
    """One measured value. `at_least` True: the target is a floor, else a ceiling."""

    name: str
    value: float | None
    unit: str
    target: float
    at_least: bool
    note: str = ""

    @property
    def passed(self):
        if self.value is None:
            return False
        if self.target is None:  # a reference figure (the stack's floor): nothing to meet
            return True
        return self.value >= self.target if self.at_least else self.value <= self.target

    def as_dict(self):
        return {**asdict(self), "passed": self.passed}


@dataclass
class Report:
    """Every figure of one run, plus the details each scenario wants kept."""

    figures: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def add(self, name, value, unit, target, at_least, note=""):
        figure = Figure(name, value, unit, target, at_least, note)
        self.figures.append(figure)
        print(f"  {_line(figure)}", flush=True)
        return figure

    @property
    def passed(self):
        return not self.errors and all(figure.passed for figure in self.figures)

    def table(self):
        rows = [("figure", "value", "target", "result")]
        for figure in self.figures:
            rows.append((figure.name, _value(figure), _target(figure), "PASS" if figure.passed else "FAIL"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        for error in self.errors:
            lines.append(f"ERROR {error}")
        return "\n".join(lines)

    def write_json(self, path):
        document = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "seconds": round(time.time() - self.started, 1),
            "machine": machine(),
            "passed": self.passed,
            "figures": [figure.as_dict() for figure in self.figures],
            "details": self.details,
            "errors": self.errors,
        }
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")


def machine():
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def _number(value):
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def _value(figure):
    return f"{_number(figure.value)} {figure.unit}".strip()


def _target(figure):
    if figure.target is None:
        return "(reference)"
    return f"{'>=' if figure.at_least else '<='} {_number(figure.target)} {figure.unit}".strip()


def _line(figure):
    verdict = "PASS" if figure.passed else "FAIL"
    if figure.target is None:
        verdict = "measured"
    note = f"  ({figure.note})" if figure.note else ""
    return f"{figure.name}: {_value(figure)}, target {_target(figure)}: {verdict}{note}"
