"""How full the server's wide calls can be under `--commit 0`: a simulation of the batcher's
rounds (cdm.sampling.batching), no models. C clients each keep one request of n images in flight;
each image belongs to one of K compartments, drawn uniformly (commit 0 on iid compartments),
and needs `rows` rows (2 with guidance) per step for S steps. A round runs one wide call of
`slots` slots x `rows_per_slot` rows, filled from the waiting rows, older requests first;
rows that do not fit wait. A request advances a step once all its rows of the step are done.

- fixed: slot k is model k (slots = K);
- flexible: each slot goes to the model with the most rows still waiting (what the server
  does: cdm.models.grouped.slot_counts; the slots whose model changed get its weights copied in place).

Prints JSON, then a table: images finished per round and how full the slots were. The
paragon finishes C * n / S images per round (all rows in one call).

    python bench/slots_sim.py
"""

from __future__ import annotations

import argparse
import random

from common import emit

from cdm.models.grouped import slot_counts


def simulate(slots: int, per_slot: int, flexible: bool, clients: int, n: int, k: int, steps: int, rows: int,
             rounds: int, seed: int = 0) -> tuple[float, float]:
    rng, count = random.Random(seed), iter(range(1 << 62))
    reqs = [None] * clients
    need: list[dict[int, int]] = [{}] * clients

    def start(i: int) -> None:
        models = [rng.randrange(k) for _ in range(n)]
        reqs[i] = dict(age=next(count), step=0, models=models)
        step(i)

    def step(i: int) -> None:
        need[i] = {}
        for m in reqs[i]["models"]:
            need[i][m] = need[i].get(m, 0) + rows

    for i in range(clients):
        start(i)
    finished = used = 0
    for _ in range(rounds):
        waiting = [sum(d.get(m, 0) for d in need) for m in range(k)]
        room = [c * per_slot for c in slot_counts(waiting, per_slot, slots)] if flexible else [per_slot] * k
        for i in sorted(range(clients), key=lambda i: reqs[i]["age"]):
            for m in need[i]:
                take = min(room[m], need[i][m])
                need[i][m] -= take
                room[m] -= take
                used += take
        for i in range(clients):
            if not any(need[i].values()):
                reqs[i]["step"] += 1
                if reqs[i]["step"] == steps:
                    finished += n
                    start(i)
                else:
                    step(i)
    return finished / rounds, used / (rounds * slots * per_slot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=2, help="rows per image and step (2 with guidance)")
    ap.add_argument("--shapes", default="8x8,16x4,10x8,8x12", help="slots x rows per slot")
    ap.add_argument("--rounds", type=int, default=20000)
    args = ap.parse_args()
    results, table = [], []
    for shape in args.shapes.split(","):
        slots, per_slot = map(int, shape.split("x"))
        for flexible in (False, True):
            if not flexible and slots != args.k:
                continue  # fixed slots are one per model
            images, full = simulate(slots, per_slot, flexible, args.clients, args.n, args.k, args.steps, args.rows,
                                    args.rounds)
            results.append(dict(slots=slots, rows_per_slot=per_slot, flexible=flexible, images_per_round=images,
                                full=full))
            table.append([shape, "flexible" if flexible else "fixed", f"{images:.2f}", f"{full:.0%}"])
    paragon = args.clients * args.n / args.steps
    emit(dict(clients=args.clients, n=args.n, k=args.k, steps=args.steps, rows=args.rows,
              paragon_images_per_round=paragon, results=results),
         f"one wide call per round; the paragon finishes {paragon:.2f} images per round",
         ["slots x rows", "slot lists", "images per round", "slots full"], table)


if __name__ == "__main__":
    main()
