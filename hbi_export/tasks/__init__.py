"""PyTorch models for video QA and captioning, and their export (issue 10)."""
