"""``medhotline speech serve``: a speech server on this machine, speaking Vosk's WebSocket protocol.

For the sandbox, the tests and the demo (``--port 0``: an ephemeral port; the first line printed is
``listening on ws://host:port``), and for a small site without a ``vosk-server`` farm. It loads the model given
with ``--model`` (default ``speech.model_path``) and serves until SIGTERM or Ctrl-C. One line per stream opened and
closed follows on stdout; no audio and no text is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from ground.errors import EXIT_OK, CommandError
from keywords.speech import SpeechModel
from keywords.speech_server import run_until_stopped

if TYPE_CHECKING:
    from ground.config import Config


def _report(line: str) -> None:
    print(line, flush=True)  # flushed: whoever started the server reads the URL from the first line


def _serve(config: Config, args: argparse.Namespace) -> int:
    model_path: Path | None = args.model or config.speech.model_path
    if model_path is None:
        raise CommandError("speech serve needs a model: --model PATH, or speech.model_path in the configuration")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port} is not a port (0: an ephemeral one)")
    with SpeechModel.load(model_path, workers=args.workers) as model:
        asyncio.run(run_until_stopped(model, args.host, args.port, report=_report))
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    speech = sub.add_parser("speech", help="a speech server speaking Vosk's WebSocket protocol")
    actions = speech.add_subparsers(dest="speech_action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="serve speech recognition until stopped (prints its ws:// URL)")
    serve.add_argument("--model", type=Path, help="Vosk model directory (default: speech.model_path)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=2700, help="port (default 2700, as vosk-server; 0: ephemeral)")
    serve.add_argument("--workers", type=int, default=None, help="decoding threads (default: the CPU count)")
    serve.set_defaults(func=_serve)
