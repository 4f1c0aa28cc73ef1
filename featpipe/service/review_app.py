"""The review page over a `workflows.review.ReviewSession` (FastAPI, as `app`):

    GET  /                          the page (static/review.html), opened with ?token=TOKEN
    GET  /api/state                 model, classes, progress, gate per source, recent decisions, retrain job
    GET  /api/queue?tab=review|spot the next undecided photos of a tab
    GET  /api/photos/{i}/similar    the most similar catalogue products, with labels
    POST /api/decisions             {id, index, kind, label, reviewer}: journaled before the answer
    POST /api/retrain               start a retrain in the background
    GET  /photo/{i}                 photo i's bytes; /catalogue/{name}: a catalogue image; /reviews.csv

Every request but the page and its static files carries the per-server token (header X-Review-Token, or the
query parameter token): 403 without it, so another site open in the same browser can neither decide nor read
photos. Photos are addressed by index; file names from a request are only ever looked up under one folder
(static files, catalogue images) and refused when they leave it (`safe_files`). Bad requests are answered
4xx with one line and the page keeps serving.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import UserError
from ..workflows.retrain import RetrainJob, RetrainSettings
from ..workflows.review import KINDS, TABS, ReviewSession
from .app import answer_in_one_line
from .safe_files import resolve_under

STATIC = Path(__file__).parent / "static"
TOKEN_HEADER = "X-Review-Token"


class Decision(BaseModel):
    id: str = Field(description="Made by the client, the same when it retries: a decision is recorded once")
    index: int = Field(description="The photo's index in the queue's answers")
    kind: str = Field(description=f"One of {', '.join(KINDS)}")
    label: str | None = Field(None, description="With kind 'label': one of the model's classes")
    reviewer: str = ""


def create_review_app(session: ReviewSession, token: str, retrain: RetrainSettings = RetrainSettings()) -> FastAPI:
    """The review page for `session`; `token` guards every request but the page itself; `retrain`: how the
    page's Retrain button trains."""
    jobs: list[RetrainJob] = []  # the latest last
    app = FastAPI(title="featpipe review", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)

    def check_token(request: Request) -> None:
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "missing or wrong token: open the URL that featpipe review printed")

    guarded = [Depends(check_token)]

    answer_in_one_line(app)

    @app.exception_handler(IndexError)
    async def no_such_photo(request: Request, exc: IndexError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "review.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        return FileResponse(served(STATIC, name))

    @app.get("/api/state", dependencies=guarded)
    def state() -> dict:
        session.sync()
        view = session.view
        job = jobs[-1] if jobs else None
        return {"classes": view.predictor.classes, "target": session.target, "strategy": session.strategy,
                "progress": session.progress(), "recent": session.recent(),
                "retrain": job.status() if job else None,
                "retrain_command": retrain.command(session)}

    @app.get("/api/queue", dependencies=guarded)
    def queue(tab: Annotated[str, Query(pattern="^(" + "|".join(TABS) + ")$")] = "review",
              limit: Annotated[int, Query(ge=1, le=500)] = 20) -> dict:
        session.sync()
        return {"items": session.queue(tab, limit)}

    @app.get("/api/photos/{index}/similar", dependencies=guarded)
    def similar(index: int, k: Annotated[int, Query(ge=1, le=50)] = 6) -> dict:
        try:
            items = session.similar(index, k)
        except UserError as exc:  # no catalogue for this model: the page shows the photo without evidence
            return {"items": [], "note": str(exc).splitlines()[0]}
        return {"items": items}

    @app.post("/api/decisions", dependencies=guarded)
    def decide(decision: Decision) -> dict:
        recorded, new = session.decide(decision.id, decision.index, decision.kind, decision.label,
                                       decision.reviewer)
        return {"recorded": new, "decision": recorded}

    @app.post("/api/retrain", dependencies=guarded)
    def start_retrain() -> dict:
        if jobs and jobs[-1].running:
            raise HTTPException(409, "a retrain is already running; wait for it to finish")
        jobs.append(RetrainJob(session, retrain))
        jobs[-1].start()
        return jobs[-1].status()

    @app.get("/photo/{index}", dependencies=guarded)
    def photo(index: int) -> FileResponse:
        try:
            return FileResponse(session.photo_file(index))
        except PermissionError as exc:
            raise HTTPException(403, str(exc)) from None

    @app.get("/catalogue/{name:path}", dependencies=guarded)
    def catalogue_image(name: str) -> FileResponse:
        folder = session.catalogue_images()
        if folder is None:
            raise HTTPException(404, "this model's catalogue images are not on this machine")
        return FileResponse(served(folder, name))

    @app.get("/reviews.csv", dependencies=guarded)
    def reviews_csv() -> Response:
        session.sync()
        return Response(session.csv_text(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{session.out.name}"'})

    return app


def served(folder: Path, name: str) -> Path:
    """`name` under `folder`, or 403 (it leaves the folder) / 404 (no such file)."""
    try:
        return resolve_under(folder, name)
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from None
    except FileNotFoundError as exc:
        raise HTTPException(404, str(exc)) from None
