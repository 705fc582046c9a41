"""What results become: typed results and their JSON, the export folders (compressed format, plain checkpoints, ONNX), the CLI's summaries and the plots."""
