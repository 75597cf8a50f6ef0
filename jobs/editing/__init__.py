"""infer.py's library: a video file in, an edited video file out, every input checked and
read before the model loads, every output written atomically."""
