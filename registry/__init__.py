"""MLflow tracking, best-epoch selection, ONNX export, registration and pulling models by name."""
