"""The HTTP API over a loaded Predictor (FastAPI):

    POST /predict   photos in the body (multipart, field `files`) -> label, confidence, decision, top-k
    POST /similar   a photo (field `file`) or a catalogue `id`, `k`, filters -> similar catalogue items
    GET  /health    ready or not, queue length, batches run
    GET  /model     classes, threshold, provenance
    GET  /docs      the OpenAPI page

Photos come in the request body only: no URLs, no server-side paths. Bad requests are answered 4xx with one
line (`{"detail": "..."}`) and the service keeps serving: 413 for a body over the limit, 422 for a file that
is not a readable photo (a truncated file, a decompression bomb), 503 when the queue is full, 504 when an
answer takes longer than the timeout.
"""

import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..errors import UserError
from ..workflows.predictor import Predictor
from .batching import MicroBatcher, Overloaded
from .uploads import BodyLimit, Limits, UploadError, decode_upload


def answer_in_one_line(app: FastAPI) -> None:
    """A request that does not validate is answered 422, a UserError 400, each with a one-line detail."""

    @app.exception_handler(RequestValidationError)
    async def one_line(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(exc).splitlines()[0]}, status_code=400)


def create_app(predictor: Predictor, limits: Limits = Limits(), top_k_max: int = 20) -> FastAPI:
    """The service for `predictor`; `limits` protect it (upload size, pixels, queue, timeout)."""
    batcher = MicroBatcher(lambda items: predictor.predict_decoded([d for d, _ in items], [n for _, n in items],
                                                                  top_k_max),
                           limits.max_batch, limits.batch_window, limits.max_queue, limits.timeout)
    started = time.time()
    described = predictor.describe()  # once: the model's digest hashes every weight of its head
    threshold = described["threshold"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()  # a SIGTERM lets the requests in flight finish: uvicorn waits for them, then this

    app = FastAPI(title="featpipe", version=__version__, lifespan=lifespan,
                  description="Tags product photos with a trained featpipe model and finds similar catalogue items.")

    answer_in_one_line(app)

    async def read(upload: UploadFile) -> tuple[tuple, str, bytes]:
        """(decoded photo, its name, its bytes); 422 for one that is not a readable photo."""
        name, data = upload.filename or "upload", await upload.read()
        try:
            return await run_in_threadpool(decode_upload, predictor, name, data, limits), name, data
        except UploadError as exc:
            raise HTTPException(422, str(exc)) from None

    async def answer(items: list[tuple]) -> list:
        try:
            return await batcher.submit(items)
        except Overloaded as exc:
            raise HTTPException(503, f"busy: {exc}; retry in a second", headers={"Retry-After": "1"}) from None
        except TimeoutError as exc:
            raise HTTPException(504, str(exc)) from None

    @app.post("/predict", summary="Tag photos")
    async def predict(files: Annotated[list[UploadFile], File(description="One or more photos")],
                      top_k: Annotated[int, Query(ge=1, le=top_k_max)] = 3) -> dict:
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} photos in one request; send at most {limits.max_files}")
        decoded = [(d, name) for d, name, _ in [await read(f) for f in files]]
        rows = []
        for p in await answer(decoded):
            row = p.as_row()
            rows.append(row | {"top_k": row["top_k"][:top_k]})
        return {"predictions": rows, "threshold": threshold}

    @app.post("/similar", summary="Similar catalogue items to a photo or a catalogue id")
    async def similar(file: Annotated[UploadFile | None, File(description="A photo")] = None,
                      id: Annotated[int | None, Form(description="A catalogue id instead of a photo")] = None,
                      k: Annotated[int, Form(ge=1, le=1000)] = 10,
                      where: Annotated[list[str], Form(description="COLUMN=VALUE filters, any case")] = [],
                      same: Annotated[list[str], Form(description="Columns equal to the query item's")] = [],
                      ) -> dict:
        if (file is None) == (id is None):
            raise HTTPException(400, "give exactly one query: a photo in `file` or a catalogue `id`")
        filters = {}
        for item in where:
            col, sep, value = item.partition("=")
            if not sep:
                raise HTTPException(400, f"where {item!r}: use COLUMN=VALUE")
            filters[col.strip()] = value
        query = id if id is not None else (await read(file))[2]
        items = await run_in_threadpool(predictor.similar, query, k, filters, tuple(same))
        return {"items": [{c: v for c, v in item.items() if c != "path"} for item in items]}  # no server paths

    @app.get("/health", summary="Whether the service is up, and how busy")
    async def health() -> dict:
        return {"status": "ok", "queue": batcher.pending, "uptime_s": round(time.time() - started, 1),
                "batches": batcher.stats.as_dict()}

    @app.get("/model", summary="The model this service runs")
    async def model() -> dict:
        return described | {"limits": limits.__dict__}

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    return app
