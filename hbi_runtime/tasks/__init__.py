"""Video question answering and captioning in the torch-free runtime (issue 10)."""
