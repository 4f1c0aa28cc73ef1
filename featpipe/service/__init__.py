"""Service layer: featpipe over HTTP (FastAPI on uvicorn, the `serve` extra).

`app.create_app` wraps a loaded `workflows.predictor.Predictor`; `batching` gathers concurrent requests into
one forward pass; `uploads` turns request bodies into images, refusing what is not one. `review_app` is the
review page over a `workflows.review.ReviewSession` (its static files in `static/`), `safe_files` looks up file
names from requests under one folder only. Nothing here is imported by the library below it."""
