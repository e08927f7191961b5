"""Runner process: ``python -m runner [MODEL_DIR] [--spare] [--max-batch N]``.

Loads one MLX model and serves the protocol in ``runner/protocol.py`` over its
stdin and stdout. ``MLXD_ENGINE=module:function`` names an engine loader
tried first (the tests' scripted models: ``tests/script_engine.py``).
Without MODEL_DIR it waits for a ``load`` command naming the model. With
``--spare`` it first imports MLX and mlx-lm and starts the device (seconds of
work): the daemon keeps one such spare process ready, so that loading a model
costs only the load.

A reader thread turns stdin lines into commands on a queue; the main thread
does all MLX work, draining the queue between decoding steps (and blocking on
it when there is nothing to decode).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import attrs

from runner import commands as cmd
from runner import events as ev
from runner import protocol
from runner.errors import BadInput

log = logging.getLogger("mlxd.runner")

if TYPE_CHECKING:
    from runner.embedder import Embedder
    from runner.engine import Engine

_BLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "libopenblas.so.0",
)


def preload_blas() -> None:
    """On Linux, load a system OpenBLAS before MLX so that MLX's CPU matmuls use
    it instead of the wheel's slow reference BLAS (about 30x on float32)."""
    if sys.platform != "linux" or os.environ.get("MLXD_SYSTEM_BLAS") == "0":
        return
    for path in _BLAS_CANDIDATES:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _protocol_stdout() -> BinaryIO:
    """Keep fd 1 for protocol messages only: anything a library prints goes to
    stderr instead."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _read_commands(q: queue.Queue[cmd.Command], send: Callable[[ev.Event], None]) -> None:
    """Hand the daemon's commands to the main thread; answer its pings here,
    at once, whatever the main thread is computing (MLX lets go of the GIL
    while it computes): a runner busy with a long prefill, a big embedding
    batch or a slow read is alive, and only one whose process no longer runs
    at all goes unanswered."""
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        msg = protocol.decode(line)
        try:
            command = cmd.read(msg)
        except ValueError as e:  # a bad request fails alone
            send(ev.Failed([msg.get("id")], str(e)))
            continue
        if isinstance(command, cmd.Ping):
            send(ev.Pong(command.id))
        else:
            q.put(command)
    q.put(cmd.Shutdown())  # EOF: the daemon is gone


BURST_GAP_S = 0.002  # after a request the daemon sent alone
MORE_GAP_S = 0.010  # after one it says others follow
BURST_MAX_S = 0.050


def _burst(commands: queue.Queue[cmd.Command], idle_s: float | None) -> list[cmd.Command]:
    """Wait for work while idle (at most ``idle_s``, if given: then there is
    none), then keep collecting while requests keep coming: for 2 ms after
    each, or 10 ms after one that says others follow (``more``: several
    clients at once, still being read by the daemon); 50 ms at most. Requests
    that arrive together are then prefilled as one batch instead of one
    group after another, and a lone request waits 2 ms."""
    try:
        msgs = [commands.get(timeout=idle_s)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + BURST_MAX_S
    while isinstance(last := msgs[-1], protocol.Generate):
        gap = MORE_GAP_S if last.more else BURST_GAP_S
        wait = min(gap, deadline - time.monotonic())
        if wait <= 0:
            break
        try:
            msgs.append(commands.get(timeout=wait))
        except queue.Empty:
            break
    return msgs


def memory() -> dict[str, int]:
    """MLX's view of this process's memory, and the driver's where it has
    one (``device``: all the GPU memory the process holds, see ``runner/device.py``)."""
    import mlx.core as mx

    from runner.device import held_bytes

    out = {
        "active": mx.get_active_memory(),
        "peak": mx.get_peak_memory(),
        "cache": mx.get_cache_memory(),
    }
    device = held_bytes()
    if device is not None:
        out["device"] = device
    return out


WARM_UP_AFTER_S = 0.05


def load_engine(model_dir: Path, load: cmd.Load) -> Engine | Embedder:
    """The engine for ``model_dir``, as the ``Load`` command says (``kind``
    "embed": an embedding model, ``runner/embedder.py``)."""
    if hook := os.environ.get("MLXD_ENGINE"):  # an engine the tests bring
        module, _, function = hook.partition(":")
        engine = getattr(importlib.import_module(module), function)(model_dir, load)
        if engine is not None:
            return cast("Engine", engine)
    if load.kind == "embed":
        from runner.embedder import Embedder

        return Embedder.load(model_dir)
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    from runner.engine import Engine
    from runner.grammar import Grammars
    from runner.prefix import Disk, PrefixCache
    from runner.vision import Vision, is_vision

    model: nn.Module | Vision = (
        Vision.load(model_dir, load.image_features)
        if is_vision(model_dir)
        else load_model(model_dir, lazy=True)[0]
    )
    disk = None
    if load.prefix_dir and load.prefix_disk > 0:
        try:
            disk = Disk(Path(load.prefix_dir), load.prefix_disk, load.prefix_disk_writes)
        except OSError as e:  # a folder mlxd cannot use: the model serves without
            log.warning("%s: no prefix files on disk: %s", model_dir.name, e)
    prefixes = PrefixCache(model, load.prefix_cache, disk)
    log.info("%s: %s", model_dir.name, prefixes.describe())
    prefixes.read_ahead(load.prompt)  # the first request's, meanwhile
    mx.eval(model.parameters())
    prefixes.settle()
    if load.cache_limit:  # the working memory the pool charges it, beyond weights
        mx.set_cache_limit(load.cache_limit)
    return Engine(model, load.max_batch, Grammars(model_dir), prefixes, load.prefill_chunk)


def serve(load: cmd.Load | None, out: BinaryIO, started: float, spare: bool) -> int:
    """Serve the protocol on ``out`` and stdin: the model ``load`` says, or
    the one a ``Load`` command names when it comes."""
    engine: Engine | Embedder
    writing = threading.Lock()  # the main thread and the command reader both write

    def send(event: ev.Event) -> None:
        line = ev.line(event)
        with writing:
            out.write(line)

    # Commands are read from the start, so that pings are answered while the
    # model loads too (a load is watched like a running model).
    commands: queue.Queue[cmd.Command] = queue.Queue()
    threading.Thread(target=_read_commands, args=(commands, send), daemon=True).start()
    if load is None:  # wait for the model to load
        if spare:
            _prepare_as_spare(send, started)
        load = _load_command(commands)
        if load is None:
            return 0
    t0 = time.perf_counter()
    try:
        engine = load_engine(Path(load.model_dir).resolve(), load)
    except Exception as e:
        send(ev.Fatal(_describe(e)))
        return 1

    load_s = time.perf_counter() - t0
    prefix_bytes = engine.prefixes.nbytes if engine.prefixes is not None else 0
    send(ev.Ready(os.getpid(), memory(), load_s, prefix_bytes))

    # Warm up (the device loads its kernels) only if no request comes at once:
    # a request's own first step does that work anyway, and doing it twice
    # would only slow the other models sharing the device (a preload, or
    # ``mlxd load``, has time for it).
    cold = True
    while True:
        msgs = [] if engine.active else _burst(commands, WARM_UP_AFTER_S if cold else None)
        if cold and not msgs:
            engine.warm_up()
        cold = False
        while True:
            try:
                msgs.append(commands.get_nowait())
            except queue.Empty:
                break
        for command in msgs:
            if isinstance(command, cmd.Shutdown):
                _persist(engine, send)
                return 0
            _command(engine, command, send)
        if not engine.active:
            continue
        try:
            outputs = engine.step()
        except Exception as e:
            send(ev.Failed(list(engine.request_ids()), _describe(e)))
            log.exception("a step failed; its requests got the error")
            try:
                engine.recover()
            except Exception as broken:  # its state is spoiled: the daemon loads it afresh
                log.error("cannot recover from the failed step (%s): exiting", _describe(broken))
                return 1
            continue
        if outputs:
            send(ev.Tokens(outputs))
        for req_id, vectors in getattr(engine, "answers", list)():  # an embedder's
            send(ev.Embeddings.of(req_id, vectors))


def _prepare_as_spare(send: Callable[[ev.Event], None], started: float) -> None:
    """As a spare: import what a load needs, start the device, and say what
    that holds (then it waits for the ``load`` command)."""
    import mlx.core as mx
    import mlx_lm.utils  # noqa: F401  (what load_engine needs: seconds of imports)

    from runner.engine import warm_kernels

    if mx.default_device() == mx.gpu:
        warm_kernels()  # also starts the device (a CUDA context takes a second)
    mem = memory()  # what every runner holds before its model (as the pool measures it)
    held = max(mem["active"] + mem["cache"], mem.get("device", 0))
    send(ev.Spare(os.getpid(), time.perf_counter() - started, held))


def _load_command(commands: queue.Queue[cmd.Command]) -> cmd.Load | None:
    """The daemon's ``Load`` command (None if the daemon went away first)."""
    while True:
        command = commands.get()
        if isinstance(command, cmd.Shutdown):
            return None
        if isinstance(command, cmd.Load):
            return command
        log.warning("a runner with no model ignores %r", command)


def _command(
    engine: Engine | Embedder, command: cmd.Command, send: Callable[[ev.Event], None]
) -> None:
    """Carry out one command from the daemon (``Shutdown`` aside)."""
    match command:
        case cmd.Embed(req_id, inputs):
            submit = getattr(engine, "submit", None)
            try:
                if submit is None:
                    raise ValueError("this model generates text; it does not embed")
                submit(req_id, inputs)  # read a piece a step: ``Embedder.step``
            except Exception as e:  # a bad request fails alone
                send(ev.Failed([req_id], _describe(e)))
        case protocol.Generate():
            try:
                hit = engine.add(command)
            except BadInput as e:  # the sender's: an image that does not decode
                send(ev.Failed([command.id], str(e), refused=True))
            except Exception as e:  # a bad request fails alone
                send(ev.Failed([command.id], _describe(e)))
            else:
                send(ev.Cached(command.id, hit.tokens, hit.source))
        case cmd.Cancel(req_id):
            engine.cancel(req_id)
        case cmd.PrefixLimit(nbytes):
            if engine.prefixes is not None:
                engine.prefixes.set_limit(nbytes)
        case cmd.AskStats():
            prefix = None if engine.prefixes is None else engine.prefixes.summary()
            images: dict[str, int] = getattr(engine, "image_counters", dict)()  # (not embedders)
            counters = attrs.asdict(engine.stats) | images
            send(ev.Stats(engine.active, memory(), counters, engine.chunk, prefix))
        case _:
            log.warning("a runner with a model ignores %r", command)


def _persist(engine: Engine | Embedder, send: Callable[[ev.Event], None]) -> None:
    """On the way out: free the model, say what is still held, and write the
    most recently used prefixes to disk (the daemon may start the next load
    meanwhile, in the memory the model gave back)."""
    import gc

    import mlx.core as mx

    prefixes = engine.prefixes
    engine.reset()
    if prefixes is None or prefixes.disk is None or not prefixes.nbytes:
        mx.synchronize()
        return
    engine.model = None
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    send(ev.Saving(memory(), prefixes.nbytes))
    t0 = time.perf_counter()
    before = prefixes.stats.disk_written_bytes, prefixes.stats.disk_skipped_bytes
    written = prefixes.persist()
    nbytes = prefixes.stats.disk_written_bytes - before[0]
    skipped = prefixes.stats.disk_skipped_bytes - before[1]
    send(ev.Saved(nbytes, skipped))
    log.info(
        "wrote %d cached prefixes (%d bytes) to %s in %.3f s%s",
        written,
        nbytes,
        prefixes.disk.where,
        time.perf_counter() - t0,
        f"; {skipped} bytes not written: over the hourly bound" if skipped else "",
    )


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def main() -> int:
    started = time.perf_counter()
    # Hide PyTorch before anything imports transformers: mlx-lm imports it, and
    # it imports torch wherever torch is installed (10-20 s and hundreds of MB
    # on a GPU host, for nothing: a runner uses MLX, and its tokenizer the
    # `tokenizers` backend). transformers 5 has no switch for that (USE_TORCH
    # is gone); a None in sys.modules makes importlib's find_spec, and so
    # transformers, see no torch.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]
    parser = argparse.ArgumentParser(prog="python -m runner", description=__doc__)
    parser.add_argument("model_dir", nargs="?", help="omit to wait for a load command")
    parser.add_argument(
        "--spare",
        action="store_true",
        help="before the load command, import MLX and mlx-lm and start the device",
    )
    parser.add_argument("--max-batch", type=int, default=8)
    args = parser.parse_args()
    out = _protocol_stdout()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    preload_blas()
    load = cmd.Load(args.model_dir, args.max_batch) if args.model_dir else None
    return serve(load, out, started, args.spare)


if __name__ == "__main__":
    try:
        code = main()
    except BrokenPipeError:
        code = 1  # the daemon is gone; nobody is left to tell
    sys.stderr.flush()
    # Skip interpreter teardown: the stdin reader thread may be blocked in a
    # read, and finalizing around it can abort the process.
    os._exit(code)
