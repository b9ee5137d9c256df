"""tiny-shapes: a small SD 1.x-style pipeline trained here on procedurally drawn scenes.

scenes.py draws seeded scenes with captions, check.py measures what an image shows and
matches it against its prompt, train.py retrains the weights shipped in
diffprism/assets/tiny-shapes.
"""
