"""Auto-tags that keep their promise per source (a shop, a photo folder): spot checks decide, source by source,
whether a model's auto-tags may stand.

A model's auto-tag threshold is certified on catalogue photos; on another shop's photos its precision can fall,
and the wrong tags are confident ones, so nothing in the model's own outputs flags them. What does is checking:
an operator confirms or overturns a sample of a source's auto-tags, and `SourceGate` turns those checks into a
decision. Rules (every bound one-sided Clopper-Pearson at `alpha`, on the source's record):

- A new source starts on **probation**: its photos are auto-tagged, and a share `probation_rate` of them is
  spot-checked.
- A source whose **upper** bound on precision falls under `target_precision` is switched **off**: the checks
  show, at confidence 1 - alpha, that its auto-tags miss the target. Its photos go to review, and each review of
  a photo the model would have auto-tagged is a check of what it would have said.
- A source on probation is **certified** once its record holds at least `probation_checks` checks and its
  **lower** bound reaches the target (at 0.99 that takes 299 checks without a miss): it is then spot-checked at
  `spot_rate` only. A certified source is still switched off by the upper-bound rule.
- A source that is off starts a new record (what it did before the switch has been acted on). It comes back on
  probation once that record holds `probation_checks` checks whose upper bound reaches the target again, i.e.
  the new checks no longer show a shortfall; certification then needs the full lower-bound rule again.

The bound is tested after every check, so a source whose precision sits right at the target will eventually
trip it by chance: a false switch-off costs an operator reviews, a false auto-tag costs the promise, and the
gate errs toward the former. A perfect source never trips it (with no miss the upper bound is 1). The record
runs from the last switch-off, so a long clean history makes a later decline slower to show.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import asdict, dataclass

from scipy.stats import beta

from ..calibrate import precision_lower_bound

STATES = ("probation", "certified", "off")


@dataclass
class _Record:
    """One source's standing: its state, its checks since its last switch-off, and its checks of all time."""

    state: str = "probation"
    checks: int = 0
    correct: int = 0
    all_checks: int = 0
    all_correct: int = 0
    switch_offs: int = 0
    off_checks: int = 0  # the record that switched it off last, for the reason an operator reads
    off_correct: int = 0


class SourceGate:
    """Per-source auto-tag control from spot checks (see the module's rules). Safe to share between threads;
    `to_dict` / `from_dict` persist it as JSON."""

    def __init__(self, target_precision: float = 0.99, alpha: float = 0.05, probation_rate: float = 0.2,
                 spot_rate: float = 0.02, probation_checks: int = 30):
        _check_open_unit("target_precision", target_precision)
        _check_open_unit("alpha", alpha)
        for name, rate in (("probation_rate", probation_rate), ("spot_rate", spot_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} {rate}: must be between 0 and 1")
        if int(probation_checks) != probation_checks or probation_checks < 1:
            raise ValueError(f"probation_checks {probation_checks}: must be a whole number, at least 1")
        self.target_precision, self.alpha = float(target_precision), float(alpha)
        self.probation_rate, self.spot_rate = float(probation_rate), float(spot_rate)
        self.probation_checks = int(probation_checks)
        self._sources: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def record(self, source: str, correct: bool) -> None:
        """One check of an auto-tag from `source` (a spot check, or the review of a photo the model would have
        auto-tagged while the source was off): `correct` when the reviewer kept the model's tag."""
        with self._lock:
            r = self._sources.setdefault(source, _Record())
            r.checks, r.correct = r.checks + 1, r.correct + bool(correct)
            r.all_checks, r.all_correct = r.all_checks + 1, r.all_correct + bool(correct)
            self._update(r)

    def allows_auto(self, source: str) -> tuple[bool, str]:
        """(auto-tagging allowed, one line saying why not when it is not)."""
        with self._lock:
            r = self._sources.get(source, _Record())
            if r.state != "off":
                return True, ""
            upper = _under(self._upper(r.off_correct, r.off_checks), self.target_precision)
            return False, (f"source {source}: spot checks {r.off_correct} of {r.off_checks} right (upper bound "
                           f"{upper} < {self.target_precision:g}): its photos go to review until "
                           f"{self.probation_checks} checks clear it again ({r.checks} so far)")

    def spot_check_rate(self, source: str) -> float:
        """The share of `source`'s auto-tags to spot-check: `probation_rate` while new or on probation,
        `spot_rate` once certified; 1.0 while off, when every photo of it is reviewed."""
        with self._lock:
            state = self._sources.get(source, _Record()).state
        return {"probation": self.probation_rate, "certified": self.spot_rate, "off": 1.0}[state]

    def status(self, source: str) -> dict:
        """The source's state and its record since its last switch-off: checks, correct, precision (None before
        the first check), the one-sided bounds at alpha, its checks of all time and how often it was switched
        off."""
        with self._lock:
            r = self._sources.get(source, _Record())
            return {"source": source, "state": r.state, "checks": r.checks, "correct": r.correct,
                    "precision": r.correct / r.checks if r.checks else None,
                    "lower_bound": self._lower(r.correct, r.checks), "upper_bound": self._upper(r.correct, r.checks),
                    "all_checks": r.all_checks, "all_correct": r.all_correct, "switch_offs": r.switch_offs}

    def sources(self) -> list[str]:
        """Every source that has been checked, in the order first seen."""
        with self._lock:
            return list(self._sources)

    def to_dict(self) -> dict:
        with self._lock:
            return {"target_precision": self.target_precision, "alpha": self.alpha,
                    "probation_rate": self.probation_rate, "spot_rate": self.spot_rate,
                    "probation_checks": self.probation_checks,
                    "sources": {name: asdict(r) for name, r in self._sources.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceGate":
        """A gate as `to_dict` wrote it."""
        gate = cls(**{k: v for k, v in d.items() if k != "sources"})
        for name, fields in d.get("sources", {}).items():
            r = _Record(**fields)
            if r.state not in STATES:
                raise ValueError(f"sources: {name!r} has state {r.state!r}, not one of {', '.join(STATES)}")
            gate._sources[name] = r
        return gate

    def _update(self, r: _Record) -> None:
        """The state after a check (the rules in the module's docstring)."""
        upper = self._upper(r.correct, r.checks)
        if r.state == "off":
            if r.checks >= self.probation_checks and upper >= self.target_precision:
                r.state = "probation"
        elif upper < self.target_precision:
            r.state, r.switch_offs, r.off_checks, r.off_correct = "off", r.switch_offs + 1, r.checks, r.correct
            r.checks = r.correct = 0
        elif (r.state == "probation" and r.checks >= self.probation_checks
              and self._lower(r.correct, r.checks) >= self.target_precision):
            r.state = "certified"

    def _lower(self, correct: int, checks: int) -> float:
        return _lower_bound(correct, checks, self.alpha)

    def _upper(self, correct: int, checks: int) -> float:
        return _upper_bound(correct, checks, self.alpha)


@functools.lru_cache(maxsize=65536)
def _lower_bound(correct: int, checks: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound of the precision (0 with no check). Cached, as `_upper_bound`: each
    costs a beta quantile, and a page asks for the same few records again and again."""
    return float(precision_lower_bound(correct, checks, alpha)) if checks else 0.0


@functools.lru_cache(maxsize=65536)
def _upper_bound(correct: int, checks: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound of the precision (1 with no miss, or no check)."""
    return float(beta.ppf(1 - alpha, correct + 1, checks - correct)) if correct < checks else 1.0


def _under(value: float, target: float) -> str:
    """`value` (under `target`) with the fewest decimals, from two, that still show it under: 0.9898, not 0.99."""
    digits = 2
    while round(value, digits) >= target and digits < 6:
        digits += 1
    return f"{value:.{digits}f}"


def _check_open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} {value}: must be between 0 and 1, both excluded")
