"""Load on `cdm serve`: N concurrent clients on loopback for a bounded time against a real
server process; throughput, p50/p99 latency and errors. Prints JSON, then a table.

    python bench/serve.py --store bench-work/quality/full/iid-4 --clients 8 --seconds 60
    python bench/serve.py --quick          # builds a tiny store
    python bench/serve.py --quick --fairness   # one key floods, another sends one request at a time

--fairness measures the polite client's latency alone, then while a second key floods the
server from --clients threads, then alone again (medians, one run): the goal is a ratio
under 2x, and every admitted request (not turned away with 429/503) answered 200.
--hostile makes the flooder ignore Retry-After; the server's token bucket (--rate, --burst)
and its held-back 429s are what keep the polite key's latency then.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import console, digits_store, run_clients, train

from cdm.sampling.policy import new_key
from cdm.store.registry import Store
from cdm.store.recipes import RouterConfig, TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--store", type=Path, default=None, help="a trained store (default with --quick: a tiny one)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=None, help="default 60; quick 15")
    ap.add_argument("-n", type=int, default=4, help="images per request")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--router", default="ito")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--grouped", action="store_true", help="cdm serve --grouped (wide calls of all compartments)")
    ap.add_argument("--commit", type=float, default=None, help="each request's commit (e.g. 0: one compartment per "
                                                                 "image)")
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--per-key", type=int, default=None, help="requests one key may have admitted (server default 4)")
    ap.add_argument("--fairness", action="store_true", help="flood from one key, time another key's requests")
    ap.add_argument("--polite", type=int, default=None, help="fairness: polite requests per phase (default 20; quick 12)")
    ap.add_argument("--think", type=float, default=0.0, help="fairness: seconds the polite client waits between "
                                                               "requests (0: sends the next at once)")
    ap.add_argument("--hostile", action="store_true", help="fairness: the flooder ignores Retry-After (retries at once)")
    ap.add_argument("--rate", type=float, default=None, help="cdm serve --rate: requests/s per key (server default 2; "
                                                             "a load test: 0, no limit)")
    ap.add_argument("--burst", type=int, default=None, help="cdm serve --burst (server default 8)")
    args = ap.parse_args()
    seconds = args.seconds or (15 if args.quick else 60)
    if not args.fairness and args.per_key is None:
        args.per_key = args.clients  # a load test: all clients share one key, and may fill the queue
    if not args.fairness and args.rate is None:
        args.rate = 0  # a load test measures throughput: one key, no rate limit
    tmp = Path(tempfile.mkdtemp(prefix="cdm-serve-bench-"))
    if args.store is None:
        if not args.quick:
            ap.error("--store is needed (or --quick)")
        s = digits_store(tmp / "store", "iid:4", TrainConfig(preset="tiny", steps=40), RouterConfig(steps=40))
        train(s)
        store = s.root
    else:
        store = args.store
    with Store.open(store) as s:
        comps = sorted(s.compartments())
        labels = list(s.labels())
    key, digest = new_key()
    key2, digest2 = new_key()
    (tmp / "policy.toml").write_text(f'[users.load]\ncompartments = {json.dumps(comps)}\nkeys = ["{digest}"]\n'
                                     f'[users.polite]\ncompartments = {json.dumps(comps)}\nkeys = ["{digest2}"]\n')
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from cdm.app.cli import app; app()", "serve", str(store),
                               "--policy", str(tmp / "policy.toml"), "--port", str(port), "--workers",
                               str(args.workers), "--queue", str(args.queue), "--max-steps", str(args.steps),
                               *(["--per-key", str(args.per_key)] if args.per_key else []),
                               *(["--rate", str(args.rate)] if args.rate is not None else []),
                               *(["--burst", str(args.burst)] if args.burst is not None else []),
                               *(["--grouped"] if args.grouped else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        headers = {"X-API-Key": key}
        httpx.post(url + "/v1/generate", json={"n": args.n, "steps": args.steps}, headers=headers, timeout=600)  # warm
        if args.fairness:
            fairness(args, url, key, key2, labels, args.polite or (12 if args.quick else 20))
            return
        results: list[tuple[float, int]] = []
        stop_at = time.monotonic() + seconds

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
                while time.monotonic() < stop_at:
                    body = {"n": args.n, "steps": args.steps, "router": args.router, "guidance": args.guidance,
                            "label": rng.choice(labels), "seed": rng.randrange(1 << 30),
                            **({} if args.commit is None else {"commit": args.commit})}
                    t = time.perf_counter()
                    r = c.post("/v1/generate", json=body)
                    results.append((time.perf_counter() - t, r.status_code))
                    if r.status_code == 503:
                        time.sleep(float(r.headers.get("Retry-After", "1")) * 0.1)

        console.print(f"{args.clients} clients for {seconds:.0f} s against {url}")
        wall = run_clients(client, args.clients)
    finally:
        server.terminate()
        server.wait(30)
    ok = sorted(lat for lat, code in results if code == 200)
    codes: dict[str, int] = {}
    for _, code in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    q = lambda p: round(ok[min(len(ok) - 1, int(p * len(ok)))], 3) if ok else None  # noqa: E731
    out = dict(store=str(store), compartments=len(comps), clients=args.clients, seconds=round(wall, 1), n=args.n,
               steps=args.steps, router=args.router, workers=args.workers, queue=args.queue, grouped=args.grouped,
               commit=args.commit, guidance=args.guidance,
               requests=len(results), ok=len(ok), status_codes=codes,
               throughput_rps=round(len(ok) / wall, 3), images_per_second=round(len(ok) * args.n / wall, 2),
               latency_p50=q(0.5), latency_p99=q(0.99), latency_mean=round(statistics.mean(ok), 3) if ok else None,
               errors=len(results) - len(ok))
    print(json.dumps(out, indent=2))
    print("\n| clients | requests ok | req/s | images/s | p50 s | p99 s | non-200 |\n|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {len(ok)} | {out['throughput_rps']} | {out['images_per_second']} | {out['latency_p50']} | "
          f"{out['latency_p99']} | {codes} |")


def fairness(args, url: str, flood_key: str, polite_key: str, labels: list[str], rounds: int) -> None:
    body = {"n": args.n, "steps": args.steps, "router": args.router}

    polite_429: list[int] = []

    def polite() -> list[float]:
        lat = []
        with httpx.Client(base_url=url, headers={"X-API-Key": polite_key}, timeout=600) as c:
            for i in range(rounds):
                t = time.perf_counter()
                while True:  # a polite client honours Retry-After (its own rate limit), inside its latency
                    r = c.post("/v1/generate", json={**body, "seed": i, "label": labels[i % len(labels)]})
                    if r.status_code != 429:
                        break
                    polite_429.append(1)
                    time.sleep(float(r.headers.get("Retry-After", "1")))
                lat.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
                time.sleep(args.think * random.Random(i).uniform(0.5, 1.5))
        return lat

    alone = polite()
    stop, flood_codes = threading.Event(), []

    def flooder(i: int) -> None:
        with httpx.Client(base_url=url, headers={"X-API-Key": flood_key}, timeout=600) as c:
            while not stop.is_set():
                r = c.post("/v1/generate", json={**body, "seed": i, "label": labels[i % len(labels)]})
                flood_codes.append(r.status_code)
                if r.status_code in (429, 503):  # a client library honours Retry-After; a hostile one does not
                    time.sleep(0.01 if args.hostile else float(r.headers.get("Retry-After", "1")))

    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood fills its share first
    flooded = polite()
    stop.set()
    for t in threads:
        t.join()
    again = polite()
    codes = {str(c): flood_codes.count(c) for c in sorted(set(flood_codes))}
    admitted = sum(1 for c in flood_codes if c not in (429, 503))
    base = statistics.median(alone + again)
    out = dict(fairness=True, hostile=args.hostile, think_s=args.think, rate=args.rate, burst=args.burst, n=args.n, steps=args.steps, workers=args.workers, queue=args.queue, per_key=args.per_key,
               flood_clients=args.clients, polite_requests=rounds, polite_alone_median_s=round(base, 3),
               polite_alone_before_s=round(statistics.median(alone), 3),
               polite_alone_after_s=round(statistics.median(again), 3),
               polite_flooded_median_s=round(statistics.median(flooded), 3),
               polite_flooded_max_s=round(max(flooded), 3),
               ratio_median=round(statistics.median(flooded) / base, 2), ratio_max=round(max(flooded) / base, 2),
               flood_status_codes=codes, flood_admitted=admitted, flood_admitted_ok=codes.get("200", 0),
               admitted_lost=admitted - codes.get("200", 0), polite_lost=0, polite_429=len(polite_429))
    print(json.dumps(out, indent=2))
    print(f"\nrate {args.rate if args.rate is not None else 'default'}, burst {args.burst or 'default'}")
    print("\n| workers | think s | hostile | polite alone (median s) | polite under flood (median s) | ratio | max ratio | flood 200 / 429 / 503 | "
          "admitted lost |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.workers} | {args.think} | {args.hostile} | {out['polite_alone_median_s']} | {out['polite_flooded_median_s']} | {out['ratio_median']} | "
          f"{out['ratio_max']} | {codes.get('200', 0)} / {codes.get('429', 0)} / {codes.get('503', 0)} | "
          f"{out['admitted_lost']} |")


if __name__ == "__main__":
    main()
