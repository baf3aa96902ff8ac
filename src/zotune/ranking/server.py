"""The ranking page: a local web server through which a person ranks the candidates of each round.

    zotune rank serve --task prompts.jsonl --model smollm2-135m --output-dir runs/rank

Routes (all need the session's token, ``?token=...`` for the page, the ``X-Zotune-Token`` header
or ``?token=`` for the API; a wrong or missing one is refused with 403):

* ``GET /``: the page (``page.html``, package data);
* ``GET /api/state``: the round shown now (:meth:`RankingSession.view`);
* ``POST /api/submit``: ``{"round": r, "order": [display positions, best first]}``; answers the
  next round's view, or ``{"error": "..."}`` with 400 (bad submission, malformed JSON) or 409 (a
  stale round) and changes nothing.

The server binds 127.0.0.1 unless told otherwise; the token is random (``secrets``, 128 bits),
kept in ``<output dir>/token`` (mode 0600) so a restarted server keeps the person's URL, and
compared in constant time. Submissions are applied one at a time (a lock): a round renders m + 1
completions before it answers. Built on Starlette and uvicorn (``pip install 'zotune[rank]'``).
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from zotune.errors import ZotuneError

from zotune.steps.rank import MODES

from .session import RankingSession, SubmissionError

TOKEN_FILE = "token"


def _starlette():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ZotuneError(f"the ranking page needs starlette and uvicorn ({exc.name} is missing): "
                          "pip install 'zotune[rank]'") from None


def session_token(directory: Path) -> str:
    """The session's token: read from ``directory/token``, or made and written (mode 0600)."""
    path = Path(directory) / TOKEN_FILE
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def page_html() -> str:
    return resources.files("zotune.ranking").joinpath("page.html").read_text(encoding="utf-8")


def make_app(session: RankingSession, token: str):
    """The Starlette app serving ``session`` to whoever holds ``token``."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    lock = threading.Lock()
    page = page_html()

    def authorised(request) -> bool:
        given = request.headers.get("x-zotune-token") or request.query_params.get("token") or ""
        return secrets.compare_digest(given.encode(), token.encode())

    def refused():
        return JSONResponse({"error": "wrong or missing token: open the URL the server printed "
                                      "when it started (it ends in ?token=...)"}, status_code=403)

    def index(request):
        if not authorised(request):
            return HTMLResponse("<!doctype html><title>zotune ranking</title><h1>Access refused"
                                "</h1><p id='error'>Wrong or missing token: open the URL that "
                                "<code>zotune rank serve</code> printed when it started (it ends in "
                                "<code>?token=...</code>).</p>", status_code=403)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    def state(request):
        if not authorised(request):
            return refused()
        with lock:
            return JSONResponse(session.view())

    async def submit(request):
        if not authorised(request):
            return refused()
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError as exc:
            return JSONResponse({"error": f"malformed JSON in the submission: {exc}"},
                                status_code=400)
        return await _run(payload)

    async def _run(payload):
        from starlette.concurrency import run_in_threadpool

        def apply():
            with lock:
                try:
                    return JSONResponse(session.submit(payload))
                except SubmissionError as exc:
                    return JSONResponse({"error": str(exc), "view": session.view()},
                                        status_code=exc.status)
        return await run_in_threadpool(apply)

    return Starlette(routes=[Route("/", index), Route("/api/state", state),
                             Route("/api/submit", submit, methods=["POST"])])


def serve(session: RankingSession, directory: Path, *, host: str = "127.0.0.1", port: int = 0,
          out=None) -> None:
    """Serve ``session`` until interrupted; prints the URL (with the token) first.

    ``port=0`` takes a free port. The socket is bound and listening here, before uvicorn starts,
    so the printed URL is the real one and a browser opened at once is queued, not refused."""
    _starlette()
    import uvicorn

    out = out or sys.stdout
    token = session_token(directory)
    app = make_app(session, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ZotuneError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}/?token={token}"
    print(f"zotune rank: round {session.round} of the session in {directory}", file=out)
    print(f"zotune rank: open {url}", file=out, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@dataclass
class ServeSettings:
    """The settings of ``zotune rank serve`` that shape the session (saved; fixed on resume)."""

    task: str
    model: str = "smollm2-135m"
    m: int = 4
    k: int = 2
    # A step moves the weights by about lr * sqrt(|E|^-2 sum c_i^2 * d): 2.9 for LoRA r=8 on
    # SmolLM2 (d = 460,800) at m=4, k=2, under the candidates' own distance mu * sqrt(d) = 6.8.
    lr: float = 0.005
    mu: float = 0.01
    mode: str = "plain"
    seed: int = 0
    prompts_per_round: int = 2
    max_new_tokens: int = 32
    temperature: float = 0.7
    trainable: str = "lora"
    lora_r: int = 8

    def check(self) -> None:
        if self.m < 2:
            raise ZotuneError(f"--m must be >= 2 (candidates per round), got {self.m}")
        if not 1 <= self.k <= self.m:
            raise ZotuneError(f"--k must be in 1..m={self.m}, got {self.k}")
        if self.prompts_per_round < 1:
            raise ZotuneError(f"--prompts-per-round must be >= 1, got {self.prompts_per_round}")
        if self.mode not in MODES:
            raise ZotuneError(f"--mode must be one of: {', '.join(MODES)}; got {self.mode!r}")
        if self.trainable not in ("lora", "full"):
            raise ZotuneError(f"--trainable must be one of: lora, full; got {self.trainable!r}")


def text_session(settings: ServeSettings, directory: Path) -> RankingSession:
    """Build the session of ``zotune rank serve``: the model (LoRA on it by default), RankSGD over
    its trainable parameters, completions of the prompts file; resumed from ``directory``."""
    from zotune.rng import mix

    from .models import load_lm
    from .text import Completer, Prompts

    settings.check()
    task = Prompts.from_jsonl(settings.task)
    model, tokenizer = load_lm(settings.model, trainable=settings.trainable,
                               lora_r=settings.lora_r, seed=settings.seed)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = _rank_sgd(list(params.items()), settings)
    complete = Completer(model, tokenizer, max_new_tokens=settings.max_new_tokens,
                         temperature=settings.temperature)

    def prompts(r):
        return task.for_round(r, settings.prompts_per_round)

    def decode_seed(r):
        return mix(settings.seed, r, 0xDEC0DE) % (1 << 31)

    def render(query, i, r):
        with query.at(i):
            return complete(prompts(r), decode_seed(r))

    def render_current(r):
        return complete(prompts(r), decode_seed(r))

    saved = asdict(settings)
    saved["task"] = str(Path(settings.task).resolve())
    return RankingSession(opt, params, k=settings.k, settings=saved, render=render,
                          render_current=render_current, prompts=prompts, directory=directory,
                          seed=settings.seed)


def _rank_sgd(named, settings: ServeSettings):
    import zotune

    return zotune.RankSGD(named, lr=settings.lr, mu=settings.mu, m=settings.m, k=settings.k,
                          mode=settings.mode, seed=settings.seed)


# ----------------------------------------------------------------------------- command line

SERVE_FLAGS = {  # flag -> (type, help); defaults come from ServeSettings (or the saved session)
    "model": (str, "embedded model name, local directory, Hub id, or tiny-<family> (a random "
                   "model, to try the page)"),
    "m": (int, "candidates per round"),
    "k": (int, "how many of them the person ranks, best first"),
    "lr": (float, "RankSGD step size"),
    "mu": (float, "smoothing radius: candidates are x + mu xi"),
    "mode": (str, "plain (a step per round), line-search or human (the authors' loop: gradient "
                  "rounds averaged until a search round, pick-the-best, accepts a move)"),
    "seed": (int, "seed of the directions, display orders and decoding"),
    "prompts_per_round": (int, "prompts each candidate completes in a round"),
    "max_new_tokens": (int, "tokens per completion"),
    "temperature": (float, "sampling temperature (0: greedy)"),
    "trainable": (str, "what RankSGD moves: lora or full"),
    "lora_r": (int, "LoRA rank"),
}


def add_serve_arguments(p) -> None:
    """The flags of ``zotune rank serve`` (added to the ``rank`` group's ``serve`` parser)."""
    p.add_argument("--task", help="prompts file: JSON Lines, one {\"prompt\": ...} per line "
                   "(default: the saved session's)")
    p.add_argument("--output-dir", required=True, help="where the session is saved after every "
                   "round; an existing session there is resumed")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, "
                   "this machine only)")
    p.add_argument("--port", type=int, default=0, help="port (default: 0, a free one)")
    defaults = ServeSettings(task="")
    for name, (kind, text) in SERVE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=f"{text} (default: {getattr(defaults, name)}; fixed for a session)")


def serve_settings(args) -> ServeSettings:
    """The session's settings: the saved ones on resume (a flag that contradicts them is an error
    at load), else the flags over ServeSettings' defaults."""
    given = {name: getattr(args, name) for name in SERVE_FLAGS if getattr(args, name) is not None}
    saved_path = Path(args.output_dir) / "history.json"
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())["settings"]
        except (OSError, ValueError, KeyError) as exc:
            raise ZotuneError(f"cannot read {saved_path}: {exc}") from None
        base = {**saved, **given}
        if args.task is not None:
            base["task"] = args.task
    else:
        if args.task is None:
            raise ZotuneError(f"--task is needed to start a new session in {args.output_dir}")
        base = {**given, "task": args.task}
    return ServeSettings(**base)


def cmd_serve(args) -> int:
    """``zotune rank serve``: build or resume the session, then serve it until Ctrl-C."""
    from zotune.run_lock import hold

    _starlette()
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with hold(directory, warn=lambda text: print(f"zotune rank: warning: {text}", file=sys.stderr)):
        session = text_session(serve_settings(args), directory).start()
        serve(session, directory, host=args.host, port=args.port)
    return 0
