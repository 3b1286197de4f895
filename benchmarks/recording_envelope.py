"""Recording envelopes: what chunked, authenticated encryption of a recording costs, in time and in memory.

Run ``python -m benchmarks.recording_envelope`` (``--megabytes N``, default 64; ``--chunk-kib``, default 64;
``--repeat``, default 3). One file of N MB of random bytes (incompressible, like audio) is made, then, each the
best of ``--repeat`` runs, every figure next to a baseline measured in the same run on the same file:

- sealing: a plain buffered copy to a new file with fsync (what any durable store of the recording costs), the same
  copy hashing what it reads and what it writes (``seal_file`` returns the SHA-256 of the plaintext and of the
  ciphertext, so this is the like-for-like floor), one-shot AES-256-GCM of the whole file held in memory (the
  crypto alone, no I/O, no chunking), and ``seal_file`` (read, encrypt chunk by chunk, hash, write, fsync);
- opening: a plain buffered read of the sealed file, one-shot AES-256-GCM decryption of it held in memory,
  ``open_sealed`` drained (read + verify every chunk), and ``unseal_file`` (+ hash both sides, write and fsync)
  next to the two buffered copies;
- memory: the growth of peak RSS during ``seal_file`` and ``open_sealed`` of the big file, each in a fresh process
  so nothing else has raised the peak (``VmHWM`` from ``/proc/self/status``, which starts afresh at exec, unlike
  ``ru_maxrss``, which a child inherits from its parent; ``ru_maxrss`` where there is no ``/proc``), next to the
  growth during the one-shot in-memory encryption; and the peak of Python allocations (``tracemalloc``) during
  ``seal_file``. The chunked figures should stay near a few chunk sizes whatever N is: that is the point of
  streaming.

Throughput is MB/s (10^6 bytes of plaintext per second). The files live in the system temporary directory, so the
fsync cost is that of its file system. The figures are for comparison on one host, not promises.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from recordings.envelope import open_sealed, seal_file, unseal_file

ROOT = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
CONTEXT = b"recording:bench:v1"
MB = 1_000_000


def best_of(repeat: int, run: Callable[[], object], cleanup: Callable[[], None] = lambda: None) -> float:
    """The shortest of ``repeat`` timed runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
        cleanup()
    return min(times)


def line(label: str, size: int, seconds: float, baselines: tuple[tuple[str, float], ...] = ()) -> None:
    ratios = "".join(f"   x{seconds / base:5.2f} the time of {name}" for name, base in baselines)
    print(f"  {label:<52} {size / MB / seconds:>7,.0f} MB/s {seconds * 1000:>8.1f} ms{ratios}")


def make_source(path: Path, megabytes: int) -> None:
    with path.open("wb") as out:
        for _ in range(megabytes):
            out.write(os.urandom(MB))


def remover(path: Path) -> Callable[[], None]:
    return lambda: path.unlink(missing_ok=True)


def durable_copy(src: Path, dst: Path, chunk: int, *, hashed: bool = False) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    read_digest, written_digest = hashlib.sha256(), hashlib.sha256()
    with src.open("rb") as source, os.fdopen(fd, "wb") as out:
        if hashed:
            while piece := source.read(chunk):
                read_digest.update(piece)
                out.write(piece)
                written_digest.update(piece)
        else:
            shutil.copyfileobj(source, out, chunk)
        out.flush()
        os.fsync(out.fileno())
    read_digest.hexdigest(), written_digest.hexdigest()


def read_through(path: Path, chunk: int) -> None:
    with path.open("rb") as source:
        while source.read(chunk):
            pass


def drain(path: Path) -> None:
    for _ in open_sealed(path, KEY, context=CONTEXT):
        pass


def one_shot_encrypt(src: Path, repeat: int) -> float:
    """The best time of AES-256-GCM over the whole file held in memory (the buffers are freed on return)."""
    whole, aead = src.read_bytes(), AESGCM(KEY)
    return best_of(repeat, lambda: aead.encrypt(bytes(12), whole, CONTEXT))


def one_shot_decrypt(src: Path, repeat: int) -> float:
    ciphertext, aead = AESGCM(KEY).encrypt(bytes(12), src.read_bytes(), CONTEXT), AESGCM(KEY)
    return best_of(repeat, lambda: aead.decrypt(bytes(12), ciphertext, CONTEXT))


def bench_seal(src: Path, work: Path, size: int, chunk: int, repeat: int) -> Path:
    print(f"sealing {size / MB:,.0f} MB in chunks of {chunk // 1024} KiB")
    copy_path, sealed = work / "copy", work / "sealed"
    copy = best_of(repeat, lambda: durable_copy(src, copy_path, chunk), remover(copy_path))
    hashed = best_of(repeat, lambda: durable_copy(src, copy_path, chunk, hashed=True), remover(copy_path))
    one_shot = one_shot_encrypt(src, repeat)
    seal = best_of(repeat, lambda: seal_file(src, sealed, KEY, context=CONTEXT, chunk_size=chunk), remover(sealed))
    line("buffered copy + fsync (baseline)", size, copy)
    line("buffered copy + fsync + SHA-256 of both (baseline)", size, hashed)
    line("one-shot AES-256-GCM in memory (baseline)", size, one_shot)
    line("seal_file (+ fsync)", size, seal, (("the copy", copy), ("the hashed copy", hashed), ("one-shot", one_shot)))
    seal_file(src, sealed, KEY, context=CONTEXT, chunk_size=chunk)
    overhead = sealed.stat().st_size - size
    print(f"  ciphertext overhead: {overhead:,} bytes ({overhead / size * 100:.3f}% of the plaintext)")
    return sealed


def bench_open(src: Path, sealed: Path, work: Path, size: int, chunk: int, repeat: int) -> None:
    print("opening")
    out, copy_path = work / "unsealed", work / "copy"
    read = best_of(repeat, lambda: read_through(sealed, chunk + 32))
    one_shot = one_shot_decrypt(src, repeat)
    opened = best_of(repeat, lambda: drain(sealed))
    copy = best_of(repeat, lambda: durable_copy(sealed, copy_path, chunk), remover(copy_path))
    hashed = best_of(repeat, lambda: durable_copy(sealed, copy_path, chunk, hashed=True), remover(copy_path))
    unseal = best_of(repeat, lambda: unseal_file(sealed, out, KEY, context=CONTEXT), remover(out))
    line("buffered read (baseline)", size, read)
    line("one-shot AES-256-GCM decrypt in memory (baseline)", size, one_shot)
    line("open_sealed, drained", size, opened, (("the read", read), ("one-shot", one_shot)))
    line("buffered copy + fsync (baseline)", size, copy)
    line("buffered copy + fsync + SHA-256 of both (baseline)", size, hashed)
    line("unseal_file (+ fsync, SHA-256 of both)", size, unseal, (("the copy", copy), ("the hashed copy", hashed)))


# Each memory probe runs in a fresh interpreter: ru_maxrss is a high-water mark for the whole process, so the
# in-memory baselines above would otherwise hide whatever the chunked code needs.
PROBE_PRELUDE = """
import resource, sys
from pathlib import Path
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from recordings.envelope import open_sealed, seal_file
src, sealed, out, chunk = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
key, context = bytes(range(32)), b"recording:bench:v1"
def peak_kib():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
before = peak_kib()
"""
PROBES = {
    "seal_file": "seal_file(src, out, key, context=context, chunk_size=chunk)",
    "open_sealed, drained": "for _ in open_sealed(sealed, key, context=context): pass",
    "one-shot AES-256-GCM in memory (baseline)": "AESGCM(key).encrypt(bytes(12), src.read_bytes(), context)",
}
PROBE_END = "\nprint(peak_kib() - before)\n"


def rss_growth_kib(statement: str, src: Path, sealed: Path, out: Path, chunk: int) -> int:
    """Peak RSS growth in KiB of ``statement`` run in a fresh process."""
    out.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", PROBE_PRELUDE + statement + PROBE_END, str(src), str(sealed), str(out), str(chunk)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    out.unlink(missing_ok=True)
    return int(result.stdout.strip())


def bench_memory(src: Path, sealed: Path, work: Path, size: int, chunk: int) -> None:
    print(f"memory while handling the {size / MB:,.0f} MB file (chunk size {chunk // 1024} KiB)")
    growth = {
        label: rss_growth_kib(statement, src, sealed, work / "probe", chunk) for label, statement in PROBES.items()
    }
    baseline = growth["one-shot AES-256-GCM in memory (baseline)"]
    for label, kib in growth.items():
        ratio = f"   x{kib / baseline:6.3f} the baseline's" if baseline > 0 and "baseline" not in label else ""
        print(f"  {'peak RSS growth, ' + label:<60} {kib / 1024:>9.1f} MiB{ratio}")
    target = work / "traced"
    tracemalloc.start()
    try:
        seal_file(src, target, KEY, context=CONTEXT, chunk_size=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        target.unlink(missing_ok=True)
    print(f"  {'tracemalloc peak, seal_file':<60} {peak / 1024 / 1024:>9.2f} MiB   ({peak / chunk:.1f} chunk sizes)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--megabytes", type=int, default=64, help="size of the recording in MB (default 64)")
    parser.add_argument("--chunk-kib", type=int, default=64, help="chunk size in KiB (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure, the best is shown (default 3)")
    args = parser.parse_args()
    if args.megabytes < 1 or args.chunk_kib < 1 or args.repeat < 1:
        parser.error("--megabytes, --chunk-kib and --repeat must be at least 1")
    chunk = args.chunk_kib * 1024
    work = Path(tempfile.mkdtemp(prefix="mhbench-envelope-"))
    try:
        src = work / "recording.wav"
        make_source(src, args.megabytes)
        size = src.stat().st_size
        sealed = bench_seal(src, work, size, chunk, args.repeat)
        print()
        bench_open(src, sealed, work, size, chunk, args.repeat)
        print()
        bench_memory(src, sealed, work, size, chunk)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
