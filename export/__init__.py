"""edgekit.export: turns a model source into a checked bundle (torch, transformers and onnx on the dev box)."""
