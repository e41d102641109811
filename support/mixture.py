"""support/mixture.py: several tasks' examples as one endless, resumable stream.

T5's multi-task mixing (Raffel et al. 2020, §3.5.2), as promot's stage 2 draws its batches
when it trains on several tasks (paper §5.4, Table 5). A leaf of promot: it imports only the
standard library and support/errors.py.
"""

import array
import random

from support.errors import BadInput

MIXING_RATES = ("equal", "proportional")  # Mixture's rules; a recipe's "mixing" setting


class Mixture:
    """Endless stream of (task name, item) drawn from several tasks' lists.

    Mixing rule: draw d picks task t with probability rates[t] / sum(rates), using
    a random number that depends only on (seed, d). `rates`: a dict, or "equal" (the
    default: the paper's RTE + WMT14 En-Fr mixture, §5.4, does not state its rule), or
    "proportional", T5's examples-proportional mixing (Raffel et al. 2020, §3.5.2):
    rates[t] = min(len(t), cap), with §3.5.3's cap K = 2**19 by default (RTE then gets
    0.5% of the draws beside WMT14's 40.8M pairs). Within a task the items come in a
    seeded permutation, a new one each epoch, so every item is seen once per epoch. The
    whole position is `state_dict()`: load it into a Mixture built from the same lists and
    seed to continue exactly where it was. With one task this is plain epoch shuffling.
    """

    def __init__(self, datasets: dict[str, list], rates="equal", seed: int = 0, cap: int = 2**19):
        self.datasets, self.seed = datasets, seed
        self.names = sorted(datasets)
        if rates in MIXING_RATES:
            sizes = {name: min(len(datasets[name]), cap) for name in self.names}
            rates = sizes if rates == "proportional" else dict.fromkeys(self.names, 1.0)
        if not datasets or any(len(items) == 0 for items in datasets.values()):
            raise BadInput("a mixture needs at least one task, and every task at least one example")
        if sorted(rates) != self.names or min(rates.values()) < 0 or sum(rates.values()) <= 0:
            raise BadInput(
                f"mixture rates {rates} must give a non-negative rate to each of {self.names}"
            )
        total = sum(rates.values())
        self.cumulative, running = [], 0.0
        for name in self.names:
            running += rates[name] / total
            self.cumulative.append(running)
        self.draws = 0
        self.positions = {name: [0, 0] for name in self.names}  # name -> [epoch, index in epoch]
        self._orders = {}

    def _order(self, name: str, epoch: int) -> list[int]:
        if self._orders.get(name, (None,))[0] != epoch:
            # 4 bytes an index, where a list takes ~36
            order = array.array("I", range(len(self.datasets[name])))
            random.Random(f"{self.seed}/{name}/{epoch}").shuffle(order)
            self._orders[name] = (epoch, order)
        return self._orders[name][1]

    def __iter__(self):
        return self

    def __next__(self):
        u = random.Random(f"{self.seed}/draw/{self.draws}").random()
        name = next((n for n, c in zip(self.names, self.cumulative) if u < c), self.names[-1])
        epoch, index = self.positions[name]
        item = self.datasets[name][self._order(name, epoch)[index]]
        index += 1
        self.positions[name] = (
            [epoch + 1, 0] if index == len(self.datasets[name]) else [epoch, index]
        )
        self.draws += 1
        return name, item

    def take(self, n: int) -> list:
        return [next(self) for _ in range(n)]

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "positions": {name: list(p) for name, p in self.positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (state_dict's). A position past the end of a task's list (the
        data shrank, --allow-change data) starts that task's next epoch."""
        if not isinstance(state, dict) or not isinstance(state.get("positions"), dict):
            raise BadInput(f"mixture state {str(state)[:80]!r}: expected seed, draws, positions")
        seed, names = state.get("seed"), sorted(state["positions"])
        if (seed, names) != (self.seed, self.names):
            raise BadInput(
                f"mixture state is for seed {seed} and tasks {names}, not seed {self.seed} and "
                f"{self.names}"
            )
        numbers = [state.get("draws"), *(n for p in state["positions"].values() for n in p)]
        shapes = [len(p) == 2 for p in state["positions"].values() if isinstance(p, list)]
        if len(shapes) != len(names) or not all(shapes) or not all(_count(n) for n in numbers):
            raise BadInput("mixture state: draws and each [epoch, index] must be integers >= 0")
        self.draws = state["draws"]
        self.positions = {
            name: [epoch + 1, 0] if index >= len(self.datasets[name]) else [epoch, index]
            for name, (epoch, index) in state["positions"].items()
        }


def _count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0
