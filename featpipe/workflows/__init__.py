"""Workflows layer: what a user does with a trained model, as a library API the CLI and the HTTP service
are thin layers over.

`predictor.Predictor` keeps a model's pipeline loaded (backbones compiled once, the catalogue's search space
embedded once) and answers predict and similar queries; `bundle` writes and reads a self-contained model
folder that runs on a machine without the dataset or the weights it was trained with. `review.ReviewSession`
is the operator's loop over a Predictor: the queue (`selection.order_queue`), the decisions (`journal`), the
per-source auto-tag gate (`sources.SourceGate`) and retraining on the reviews (`retrain`)."""
