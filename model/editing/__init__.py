"""Editing a video with a trained model: settings, content embeddings, precision, and the
pipeline from frames in to edited frames out. Reads and writes no files."""
