"""XLA's cost analysis of a compiled program, with loops counted as often as they run.

`compiled.cost_analysis()` (XLA's `HloCostAnalysis`) counts the body of every `while` loop
once, whatever its trip count. The train step runs its layers under a `lax.scan` (a while
loop of L iterations) inside the micro-batch scan (A iterations), and the chunked loss scans
over sequence chunks, so the raw figure misses most of the step's work.

`program_costs` corrects it with XLA's own counts. It reads the optimized (per-device, SPMD
partitioned) HLO module of the executable, and for every computation c that is the body of a
while loop it re-runs XLA's cost analysis on a module whose entry is c, giving C(c): c's cost
with its own inner loops counted once. With the trip counts XLA's loop analysis records on
each while instruction (`known_trip_count`), the true cost of c is

    T(c) = C(c) - sum_w C(body_w) + sum_w n_w * T(body_w)

over the while instructions w of c; a computation c calls that runs loops itself adds
T - C of its own, and a conditional adds max_b T(b) - max_b C(b) over its branches (XLA
counts the costlier branch). Fusions never hold loops. T(entry) is the cost of one run of the program. A
loop whose trip count XLA cannot prove (the sampler's decode loop) counts once; its body's
T is reported separately (`loops`) so a caller can scale it, e.g. per generated token.

Conditionals keep XLA's rule (the costlier branch), e.g. the curriculum's extra head pass and
the chunked loss's skip of padding chunks count as taken. Loop conditions count once.
"""
from __future__ import annotations

import dataclasses
import re

import jax

KEYS = ("flops", "bytes accessed", "transcendentals")

_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_WHILE = re.compile(r"\bwhile\(.*?\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:to_apply|calls|branch_computations|true_computation|false_computation)="
                    r"\{?([%\w.\-, ]+)\}?")


@dataclasses.dataclass(frozen=True)
class Loop:
    """One top-level while loop of a program: its trip count (None: not known statically)
    and the cost of one iteration (inner loops counted by their trip counts)."""
    trip_count: int | None
    body: dict[str, float]


@dataclasses.dataclass(frozen=True)
class ProgramCosts:
    total: dict[str, float]          # one run of the program, loops times their trip counts
    xla_once: dict[str, float]       # XLA's own figure (every loop body once)
    loops: tuple[Loop, ...]          # the entry computation's while loops


def _split(text: str) -> tuple[list[str], dict[str, list[str]], str]:
    """(lines before the first computation, computation name -> its lines, entry name)."""
    head, comps, current, entry = [], {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = (m.group(2), [line])
                entry = m.group(2) if m.group(1) else entry
            elif not comps:
                head.append(line)
            continue
        current[1].append(line)
        if line == "}":
            comps[current[0]] = current[1]
            current = None
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return head, comps, entry


class _Analysis:
    def __init__(self, text: str, client):
        from jax._src.lib import _jax
        from jaxlib import _hlo

        self._parse, self._cost = _hlo.hlo_module_from_text, _jax.hlo_module_cost_analysis
        self.client = client
        self.head, self.comps, self.entry = _split(text)
        self._once: dict[str, dict[str, float]] = {}
        self._true: dict[str, dict[str, float]] = {}
        self._loops: dict[str, bool] = {}

    def once(self, name: str) -> dict[str, float]:
        """XLA's cost with `name` as the entry computation (its loops counted once)."""
        if name not in self._once:
            lines = ["HloModule cost_of_" + name.replace(".", "_")] + self.head[1:]
            for comp, body in self.comps.items():
                if comp == self.entry and comp != name:
                    continue
                first = body[0].removeprefix("ENTRY ")
                lines += [("ENTRY " + first) if comp == name else first, *body[1:], ""]
            costs = self._cost(self.client, self._parse("\n".join(lines)))
            self._once[name] = {k: float(costs.get(k, 0.0)) for k in KEYS}
        return self._once[name]

    def callees(self, line: str) -> list[str]:
        return [c for group in _CALLS.findall(line) for c in (x.strip().lstrip("%") for x in group.split(","))
                if c in self.comps]

    def has_loop(self, name: str) -> bool:
        """Whether `name` runs a while loop, itself or through a computation it calls."""
        if name not in self._loops:
            self._loops[name] = False   # (no recursion in HLO; guards repeated visits)
            self._loops[name] = any(_WHILE.search(line) or any(self.has_loop(c) for c in self.callees(line))
                                    for line in self.comps[name][1:])
        return self._loops[name]

    def whiles(self, name: str) -> list[tuple[str, int | None]]:
        """(body, trip count) of the while instructions of computation `name`."""
        found = []
        for line in self.comps[name][1:]:
            w = _WHILE.search(line)
            if w:
                trip = _TRIP.search(line)
                found.append((w.group(1), int(trip.group(1)) if trip else None))
        return found

    def true(self, name: str) -> dict[str, float]:
        """The cost of one run of `name` with every loop counted as often as it runs."""
        if name in self._true:
            return self._true[name]
        total = dict(self.once(name))
        for line in self.comps[name][1:]:
            w = _WHILE.search(line)
            if w:       # XLA counted the body once: count it trip-count times instead
                trip = _TRIP.search(line)
                n = int(trip.group(1)) if trip else 1
                once, true = self.once(w.group(1)), self.true(w.group(1))
                for k in KEYS:
                    total[k] += n * true[k] - once[k]
                continue
            called = [c for c in self.callees(line) if self.has_loop(c)]
            if not called:
                continue
            if " conditional(" in line:   # XLA takes the costlier branch: so do we, with loops counted
                branches = self.callees(line)
                for k in KEYS:
                    total[k] += (max(self.true(b)[k] for b in branches)
                                 - max(self.once(b)[k] for b in branches))
            else:
                for c in called:
                    once, true = self.once(c), self.true(c)
                    for k in KEYS:
                        total[k] += true[k] - once[k]
        self._true[name] = total
        return total


def program_costs(compiled) -> ProgramCosts:
    """Per-device costs of one run of a compiled (`jax.jit(...).lower(...).compile()`) program."""
    text = compiled.as_text()
    client = jax.devices()[0].client
    for device in _devices(compiled):
        client = device.client
        break
    analysis = _Analysis(text, client)
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    loops = tuple(Loop(trip, analysis.true(body)) for body, trip in analysis.whiles(analysis.entry))
    return ProgramCosts(total=analysis.true(analysis.entry),
                        xla_once={k: float((raw or {}).get(k, 0.0)) for k in KEYS}, loops=loops)


def _devices(compiled):
    try:
        return list(compiled.input_shardings[0][0].device_set) if compiled.input_shardings[0] else []
    except Exception:  # noqa: BLE001 - only picks the client; the default one is fine
        return []

