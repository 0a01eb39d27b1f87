"""Package data: the default concept vocabulary (``vocabulary.txt``) used to label vision features."""
