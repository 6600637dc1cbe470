"""Load on `cdm serve`: N concurrent clients on loopback for a bounded time against a real
server process; throughput, p50/p99 latency and errors. Prints JSON, then a table.

    python bench/serve.py --store bench-work/quality/full/iid-4 --clients 8 --seconds 60
    python bench/serve.py --quick          # builds a tiny store
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

sys.path.insert(0, str(Path(__file__).parent))

from common import console, digits_store, train  # noqa: E402

from cdm.policy import new_key  # noqa: E402
from cdm.store import Store  # noqa: E402
from cdm.train import RouterConfig, TrainConfig  # noqa: E402


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
    ap.add_argument("--queue", type=int, default=8)
    args = ap.parse_args()
    seconds = args.seconds or (15 if args.quick else 60)
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
    (tmp / "policy.toml").write_text(f'[users.load]\ncompartments = {json.dumps(comps)}\nkeys = ["{digest}"]\n')
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from cdm.cli import app; app()", "serve", str(store),
                               "--policy", str(tmp / "policy.toml"), "--port", str(port), "--workers",
                               str(args.workers), "--queue", str(args.queue), "--max-steps", str(args.steps)],
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
        results: list[tuple[float, int]] = []
        stop_at = time.monotonic() + seconds

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(base_url=url, headers=headers, timeout=600) as c:
                while time.monotonic() < stop_at:
                    body = {"n": args.n, "steps": args.steps, "router": args.router,
                            "label": rng.choice(labels), "seed": rng.randrange(1 << 30)}
                    t = time.perf_counter()
                    r = c.post("/v1/generate", json=body)
                    results.append((time.perf_counter() - t, r.status_code))
                    if r.status_code == 503:
                        time.sleep(float(r.headers.get("Retry-After", "1")) * 0.1)

        console.print(f"{args.clients} clients for {seconds:.0f} s against {url}")
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
    ok = sorted(lat for lat, code in results if code == 200)
    codes: dict[str, int] = {}
    for _, code in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    q = lambda p: round(ok[min(len(ok) - 1, int(p * len(ok)))], 3) if ok else None  # noqa: E731
    out = dict(store=str(store), compartments=len(comps), clients=args.clients, seconds=round(wall, 1), n=args.n,
               steps=args.steps, router=args.router, workers=args.workers, queue=args.queue,
               requests=len(results), ok=len(ok), status_codes=codes,
               throughput_rps=round(len(ok) / wall, 3), images_per_second=round(len(ok) * args.n / wall, 2),
               latency_p50=q(0.5), latency_p99=q(0.99), latency_mean=round(statistics.mean(ok), 3) if ok else None,
               errors=len(results) - len(ok))
    print(json.dumps(out, indent=2))
    print("\n| clients | requests ok | req/s | images/s | p50 s | p99 s | non-200 |\n|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {len(ok)} | {out['throughput_rps']} | {out['images_per_second']} | {out['latency_p50']} | "
          f"{out['latency_p99']} | {codes} |")


if __name__ == "__main__":
    main()
