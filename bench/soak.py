#!/usr/bin/env python
"""Long runs of the app: one live ``python app.py --tiny`` server, N requests in a row through gradio_client.

The mix, by request number i (``plan``): fresh generations with distinct seeds (vertex colours,
every fifth a UV texture), every tenth a repeat of a recent one (stored) or now and then of one long
evicted (made again), every 25th a variants call and, three requests later, one of those variants
opened (a stored result: what a click on a variant or a history entry asks for; those clicks are
private events, not in the API, so ``/generate`` with the entry's settings stands for them), two
bad inputs in every 50 (an empty prompt, a negative seed), and a new session (visitor) every
``--session-every`` requests. Every ``--every`` requests it samples the server process and its
children: RSS, threads, open files and descriptors; the output folder's bytes; the files in the
server's own temporary folder (its TMPDIR, with GRADIO_TEMP_DIR inside) and current directory; new
names directly under /tmp (other processes' too, on a shared machine). RSS growth is the
least-squares slope after ``--warmup`` requests. The client's own temporary files go to a folder of
its own (gradio_client leaves an empty folder there per downloaded file).

    python bench/soak.py --requests 1000 --shared --json bench/results/soak-….json --record BENCHMARKS.md
    python bench/soak.py --requests 200 --count-objects 50   # + the server's live objects by type (gc)
    python bench/soak.py --from-json RESULT.json --record BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.tables import add_rows, commit, machine  # noqa: E402

SECTION = "## Long runs (soak)"
TABLE = """| date | commit | machine | requests (fresh, answered from the store, variants, bad) | RSS from the warm-up's end → end (MB) | RSS growth (MB per 1,000 requests, fit) | threads | open files | output folder max / bound (MB) | written outside | note |
|---|---|---|---|---|---|---|---|---|---|---|
"""
INTRO = ("Measured by `bench/soak.py`: one `python app.py --tiny` server (CPU, `OMP_NUM_THREADS=1`, a 50 MB "
         "output bound), requests in a row through gradio_client at mesh resolution 128 (vertex colours; every fifth "
         "a 128² UV texture), a new session every ten. RSS is the server's with its children; the growth is the "
         "least-squares slope after the warm-up. \"Written outside\": files in the server's TMPDIR (with "
         "GRADIO_TEMP_DIR) and current directory at the end.")
PROMPTS = ["a wooden chair", "a red sports car", "a teapot", "a corgi taking a selfie", "a steam engine train",
           "a humanoid robot playing the cello", "a table with dim sum on it", "a frog wearing a sweater"]
#: Runs the app with a SIGUSR1 handler that writes the live objects' counts by type (and, with
#: SOAK_TRACEMALLOC=1, the top allocation sites) to $SOAK_COUNTS: for finding what grows.
COUNTING_SERVER = r"""
import collections, gc, json, os, runpy, signal, sys
from triplane_turbo.web.memory import heap_bytes
if os.environ.get("SOAK_TRACEMALLOC") == "1":
    import tracemalloc; tracemalloc.start(8)
def dump(*_):
    gc.collect()
    counts = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
    out = {"types": dict(counts), "python_blocks": sys.getallocatedblocks()}
    heap = heap_bytes()  # glibc's view of its heaps: in use, free but kept, mapped
    if heap is not None:
        out["malloc_mb"] = {"in_use": heap["in_use"] / 2**20, "free_kept": heap["free_kept"] / 2**20,
                            "mmapped": heap["mapped"] / 2**20}
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        import tracemalloc
        stats = tracemalloc.take_snapshot().statistics("traceback")[:15]
        out["top"] = [[s.size, s.count, [str(f) for f in s.traceback[-6:]]] for s in stats]
    if os.environ.get("SOAK_REFERRERS"):  # who holds the newest object of this type (type name)
        objs = [o for o in gc.get_objects() if type(o).__qualname__ == os.environ["SOAK_REFERRERS"]]
        chain, seen, obj = [], {id(objs)}, objs[-1] if objs else None
        for _ in range(8 if objs else 0):
            holders = [r for r in gc.get_referrers(obj) if id(r) not in seen and type(r).__name__ != "frame"]
            seen.add(id(holders))
            if not holders:
                break
            obj = holders[0]
            seen.add(id(obj))
            keys = list(obj)[:8] if isinstance(obj, dict) else ""
            chain.append(f"{type(obj).__module__}.{type(obj).__qualname__} {str(keys)[:300]}")
        out["referrers"] = chain
    path = os.environ["SOAK_COUNTS"]
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, dump)
sys.argv = [os.environ["SOAK_APP"], "--tiny"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if p.is_file()]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in files_under(folder))


def start_server(root: Path, max_bytes: int, texture_size: int, extra_env: dict, counting: bool):
    """The app in a subprocess, its folders under ``root``: (Popen, url, folders)."""
    folders = {name: root / name for name in ("cwd", "outputs", "server-tmp")}
    for name in ("cwd", "server-tmp"):
        folders[name].mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "TRIPLANE_TURBO_OUTPUT_DIR": str(folders["outputs"]), "TRIPLANE_TURBO_OUTPUT_MAX_GB": str(max_bytes / 1e9),
           "TRIPLANE_TURBO_TEXTURE_SIZE": str(texture_size), "TMPDIR": str(folders["server-tmp"]),
           "GRADIO_TEMP_DIR": str(folders["server-tmp"] / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO),
           "SOAK_COUNTS": str(root / "counts.json"), "SOAK_APP": str(REPO / "app.py"), **extra_env}
    command = ["-c", COUNTING_SERVER] if counting else [str(REPO / "app.py"), "--tiny"]
    log = root / "server.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, *command], cwd=folders["cwd"], env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not all(m in log.read_text(errors="replace") for m in ("Running on local URL", "model ready")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the app did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc, f"http://127.0.0.1:{port}/", folders, log


def sample(server, folders: dict, tmp_before: set | None = None, exclude: set = frozenset()) -> dict:
    """The server's resources now (``server``: a psutil.Process; ``folders``: its "outputs", its current
    directory "cwd" and its temporary folder "server-tmp"; ``tmp_before``: /tmp's names at the start)."""
    procs = [server, *server.children(recursive=True)]
    outside = files_under(folders["cwd"], folders["server-tmp"])
    new_tmp = sorted(set(os.listdir("/tmp")) - tmp_before - exclude) if tmp_before is not None else []
    return dict(rss_mb=sum(p.memory_info().rss for p in procs) / 2**20, threads=sum(p.num_threads() for p in procs),
                open_files=sum(len(p.open_files()) for p in procs), fds=sum(p.num_fds() for p in procs),
                connections=len(server.net_connections()), folder_bytes=folder_bytes(folders["outputs"]),
                outside_files=len(outside), outside_bytes=sum(p.stat().st_size for p in outside),
                outside_names=sorted(str(p) for p in outside)[:50], new_tmp=new_tmp[:10])


def object_counts(server, path: Path, timeout: float = 120) -> dict:
    """The counting server's dump (SIGUSR1), once it is written."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    server.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_mtime_ns != before) and time.monotonic() < deadline:
        time.sleep(0.2)
    return json.loads(path.read_text())


def growth(before: dict, after: dict, top: int = 15) -> list[tuple[str, int]]:
    diff = {name: after.get(name, 0) - before.get(name, 0) for name in set(before) | set(after)}
    return sorted(((n, d) for n, d in diff.items() if d), key=lambda item: -abs(item[1]))[:top]


def plan(i: int) -> str:
    """The kind of request number ``i`` (from 1)."""
    if i % 25 == 24:
        return "variants"
    if i % 25 == 2 and i > 25:
        return "open-variant"
    if i % 10 == 9 and i > 10:
        return "repeat"
    if i % 50 == 12:
        return "bad-prompt"
    if i % 50 == 37:
        return "bad-seed"
    return "fresh"


class Requests:
    """Sends request number i of the mix (``plan``) through a gradio_client ``Client``; counts the kinds,
    the answers from the store and the unexpected failures (a bad input accepted, a good one refused)."""

    def __init__(self, client, session_every: int = 10):
        self.client, self.session_every = client, session_every
        self.made: list[dict] = []  # settings of the fresh generations that succeeded
        self.variant_seeds: list[int] = []
        self.kinds: dict[str, int] = {}
        self.failures: list[str] = []
        self.stored = 0

    def send(self, i: int) -> None:
        if self.session_every and i % self.session_every == 0:
            self.client.reset_session()  # a new visitor: Gradio keeps state per session
        kind = plan(i) if (self.made or plan(i) != "repeat") and (self.variant_seeds or plan(i) != "open-variant") \
            else "fresh"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        settings = dict(prompt=PROMPTS[i % len(PROMPTS)], seed=1000 + i, randomize_seed=False, mesh_resolution=128,
                        remove_floaters=False, simplify=False, target_faces=20000,
                        texture="uv" if i % 5 == 0 else "vertex")
        if kind == "repeat":  # a recent one (stored), or now and then one long evicted (made again)
            settings = self.made[-1 - i % 8 if i % 50 != 19 else i % 7 % len(self.made)]
        elif kind == "open-variant":  # what a click on a variant (or a history entry) asks for
            settings = {**settings, "prompt": PROMPTS[0], "seed": self.variant_seeds[-1], "texture": "uv"}
        elif kind == "bad-prompt":
            settings["prompt"] = " "
        elif kind == "bad-seed":
            settings["seed"] = -5
        try:
            if kind == "variants":
                seed = 100_000 + 8 * i
                self.client.predict(prompt=PROMPTS[0], seed=seed, count=2, mesh_resolution=128, api_name="/variants")
                self.variant_seeds = [seed, seed + 1]
            else:
                outputs = self.client.predict(**settings, api_name="/generate")
                self.stored += bool(outputs[1].get("cached"))
                if kind == "fresh":
                    self.made.append(settings)
            if kind.startswith("bad"):
                self.failures.append(f"{i} {kind}: accepted")
        except Exception as exc:  # noqa: BLE001 -- the bad inputs' answers; anything else is reported
            if not kind.startswith("bad"):
                self.failures.append(f"{i} {kind}: {type(exc).__name__}: {str(exc)[:200]}")


def rss_growth(samples: list[dict], warmup: int) -> float:
    """MB per 1,000 requests: the least-squares slope of RSS over the samples from request ``warmup`` on."""
    import numpy as np

    later = [s for s in samples if s["request"] >= warmup]
    if len(later) < 3:
        return float("nan")
    return float(np.polyfit([s["request"] for s in later], [s["rss_mb"] for s in later], 1)[0] * 1000)


def run(args) -> dict:
    import psutil

    root = Path(tempfile.mkdtemp(prefix="triplane-soak-", dir=args.workdir))
    client_tmp = root / "client-tmp"  # gradio_client leaves an empty folder per downloaded file in tempfile's dir
    client_tmp.mkdir()
    tempfile.tempdir = str(client_tmp)
    os.environ["TMPDIR"] = str(client_tmp)
    from gradio_client import Client

    tmp_before = set(os.listdir("/tmp"))
    extra_env = dict(item.split("=", 1) for item in args.env)
    proc, url, folders, log = start_server(root, args.max_bytes, args.texture_size, extra_env, args.count_objects > 0)
    server = psutil.Process(proc.pid)
    downloads = root / "downloads"
    requests = Requests(Client(url, verbose=False, download_files=str(downloads), ssl_verify=False),
                        args.session_every)
    samples, counts, measured_commit = [], [], commit()  # the code measured, whatever is committed meanwhile
    started = time.perf_counter()
    try:
        samples.append(dict(request=0, **sample(server, folders, tmp_before, {root.name})))
        if args.count_objects:
            counts.append(dict(request=0, **object_counts(server, root / "counts.json")))
        for i in range(1, args.requests + 1):
            requests.send(i)
            if i % args.every == 0 or i == args.requests:
                shutil.rmtree(downloads, ignore_errors=True)
                samples.append(dict(request=i, seconds=round(time.perf_counter() - started, 1),
                                    **sample(server, folders, tmp_before, {root.name})))
                print(json.dumps({k: v for k, v in samples[-1].items() if k not in ("outside_names", "new_tmp")}),
                      file=sys.stderr, flush=True)
            if args.count_objects and (i % args.count_objects == 0 or i == args.requests):
                counts.append(dict(request=i, **object_counts(server, root / "counts.json")))
                print(f"objects {i}:", growth(counts[0]["types"], counts[-1]["types"]), counts[-1].get("referrers", ""),
                      "python blocks", counts[-1]["python_blocks"], "malloc", counts[-1].get("malloc_mb"),
                      file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    later = [s for s in samples if s["request"] >= args.warmup] or samples
    result = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commit=measured_commit,
                  machine=machine("cpu"), shared=args.shared, note=args.note, requests=args.requests,
                  kinds=requests.kinds, stored_answers=requests.stored, failures=requests.failures,
                  seconds=round(time.perf_counter() - started, 1), load_average=os.getloadavg(), warmup=args.warmup,
                  session_every=args.session_every, env=extra_env, texture_size=args.texture_size,
                  max_bytes=args.max_bytes, rss_warm_mb=later[0]["rss_mb"], rss_end_mb=samples[-1]["rss_mb"],
                  rss_growth_mb_per_1000=rss_growth(samples, args.warmup),
                  threads=[min(s["threads"] for s in later), max(s["threads"] for s in later)],
                  open_files=[min(s["open_files"] for s in later), max(s["open_files"] for s in later)],
                  fds=[min(s["fds"] for s in later), max(s["fds"] for s in later)],
                  folder_max_bytes=max(s["folder_bytes"] for s in samples),
                  outside_end=samples[-1]["outside_files"], outside_names=samples[-1]["outside_names"],
                  new_tmp_end=samples[-1]["new_tmp"], samples=samples)
    if counts:
        result["object_growth"] = growth(counts[1 if len(counts) > 2 else 0]["types"], counts[-1]["types"], 40)
        result["tracemalloc_top"] = counts[-1].get("top")
        result["heap"] = [dict(request=c["request"], python_blocks=c["python_blocks"], malloc_mb=c.get("malloc_mb"))
                          for c in counts]
    if args.keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return result


def record(path: Path, result: dict) -> None:
    kinds = result["kinds"]
    mix = (f"{result['requests']} ({kinds.get('fresh', 0)}, {result['stored_answers']}, {kinds.get('variants', 0)}, "
           f"{kinds.get('bad-prompt', 0) + kinds.get('bad-seed', 0)})")
    note = "; ".join(filter(None, [f"machine shared with other jobs (load {result['load_average'][0]:.1f})"
                                   if result.get("shared") else "", " ".join(f"{k}={v}" for k, v in
                                                                            result["env"].items()),
                                   f"{len(result['failures'])} unexpected failures" if result["failures"] else "",
                                   result.get("note") or ""]))
    row = [result["date"][:10], result["commit"] or "–", result["machine"], mix,
           f"{result['rss_warm_mb']:.0f} (request {result['warmup']}) → {result['rss_end_mb']:.0f}", f"{result['rss_growth_mb_per_1000']:+.0f}",
           "{}–{}".format(*result["threads"]), "{}–{}".format(*result["open_files"]),
           f"{result['folder_max_bytes'] / 1e6:.1f} / {result['max_bytes'] / 1e6:.0f}",
           f"{result['outside_end']} files", note or "–"]
    add_rows(path, SECTION, INTRO, TABLE, [row])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="requests before the RSS fit starts")
    parser.add_argument("--session-every", type=int, default=10,
                        help="a new session (visitor) every this many requests; 0: one session throughout")
    parser.add_argument("--every", type=int, default=10, help="sample the server every this many requests")
    parser.add_argument("--max-bytes", type=int, default=50_000_000, help="the output folder's bound")
    parser.add_argument("--texture-size", type=int, default=128)
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra environment of the server, e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--count-objects", type=int, default=0, metavar="N",
                        help="every N requests, count the server's live objects by type (gc); SOAK_TRACEMALLOC=1 in "
                             "--env adds the top allocation sites")
    parser.add_argument("--workdir", help="where the server's folders go (default: the system's temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the server's folders and log")
    parser.add_argument("--shared", action="store_true", help="other jobs run meanwhile (noted in the row)")
    parser.add_argument("--note", default="")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--from-json", type=Path, help="record a result written earlier")
    parser.add_argument("--record", type=Path, metavar="BENCHMARKS.md")
    args = parser.parse_args(argv)
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    summary = {k: v for k, v in result.items() if k not in ("samples", "object_growth", "tracemalloc_top")}
    print(json.dumps(summary, indent=1))
    if result.get("object_growth"):
        print("object growth:", result["object_growth"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.record:
        record(args.record, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
