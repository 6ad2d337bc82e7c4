"""What a user does with a trained model: measure it (`report`, `intensity`), compare runs (`compare`),
cross-validate (`cv`), use it (`predict`, `onnx`). Metrics are pure functions in `metrics`."""
