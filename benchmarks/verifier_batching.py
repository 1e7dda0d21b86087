"""Does batching verifications of concurrent requests help? (docs/proxy.md, "micro-batched")

    python benchmarks/verifier_batching.py

Concurrent callers each verify 3 QQP pairs (a request's top-3) through PairVerifier.score, with batches
capped at 3 pairs (one request) or 24 (8 requests). Prints, per concurrency and cap: ms per request
(wall / requests), p50 and p99 latency of a call. In-process, no proxy, the installed fp32 verifier.
"""
import asyncio, json, time, numpy as np
from velo_proxy.verifier import PairVerifier
from velo_proxy.settings import Settings
rows=[json.loads(l) for l in open(__import__('pathlib').Path(__file__).parents[1] / 'tests/data/pairs/qqp-dev.jsonl')][:400]
qs=[r['q1'] for r in rows]; cs=[r['q2'] for r in rows]
async def run(batch_max, conc, rounds=6):
    v=PairVerifier(Settings().verifier_dir, batch_max=batch_max)
    await v.score(qs[0],[cs[0]])
    lat=[]; t0=time.perf_counter()
    for r in range(rounds):
        async def one(i):
            s=time.perf_counter(); await v.score(qs[i],[cs[i],cs[i+1],cs[i+2]]); lat.append(time.perf_counter()-s)
        await asyncio.gather(*(one(r*conc+i) for i in range(conc)))
    wall=time.perf_counter()-t0; v.close()
    return wall/(rounds*conc)*1000, np.percentile(lat,50)*1000, np.percentile(lat,99)*1000
async def main():
    for conc in (1,8,32):
        for bm in (3,24):
            per_request, p50, p99 = await run(bm, conc, rounds=6 if conc > 1 else 40)
            print(f"concurrency {conc:2d}, batch cap {bm:2d} pairs: {per_request:.1f} ms/request, p50 {p50:.1f} ms, p99 {p99:.1f} ms")
if __name__ == "__main__":
    asyncio.run(main())
